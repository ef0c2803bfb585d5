"""Pricing from the route, against real nodes' receipts: over a seeded random mix of requests (completions and chat,
``n`` 1-4, streamed or not, stop strings, a fine-tuned model's soft prompt, and a node killed mid-generation so the
gateway fails over and replays), what users were charged >= what the nodes' receipts the gateway accepted cost x
(1 + margin), and no account ever goes negative. A gateway whose price cap is below the route refuses, at no cost.

Its own swarm (on the package's devnet and ledger), priced like a real one: 10^13 credit wei per token per block, so
the route costs 4 x 10^13 wei (40 micro-credits) per token, four times the old flat price of 10 micro-credits; on the
flat price this test fails (the nodes were paid 6.6x what users were charged)."""

from __future__ import annotations

import io
import math
import random
import time
from fractions import Fraction

import httpx
import openai
import pytest
import torch

from nectar.api.launch import ApiProcess
from tests.api.conftest import new_customer
from tests.api.utils import api_env, wait_for

pytestmark = pytest.mark.slow

PRICE = 10**13  # credit wei per token per block, each node
BLOCKS = 4
MARGIN = 0.2
WEI_PER_MICRO = 10**12
RESERVE = 10 * 10**18  # the gateway's escrow reserved for each node of this swarm


@pytest.fixture(scope="module")
def priced(market, tmp_path_factory):
    """A swarm of its own: alpha (0:2) and gamma (2:4); beta (2:4, registered now) joins later, as the failover's
    spare."""
    from nectar.node.local_swarm import LocalSwarm
    from nectar.operator import ensure_registered

    home = tmp_path_factory.mktemp("priced-swarm")
    swarm = LocalSwarm(
        workdir=home, env={"NECTAR_HOME": str(market.home), "NECTAR_DEPLOYMENT": str(market.home / "deployment.json")}
    )
    chain = market.chain

    def register(name):  # staked and reserved for up front: the gateway's stake gate reads stakes every 30 s
        keys = ensure_registered(chain, swarm.workdir / "keys" / name, funder_key=chain.default_key())
        chain.reserve(market.gateway_key, keys.address, RESERVE)

    def add(name, blocks, throughput="100"):
        args = ["--throughput", throughput, "--announce-period", "2", "--price", str(PRICE)]
        args += ["--ledger-url", market.ledger_url]
        return swarm.add_node(market.checkpoint, blocks=blocks, name=name, extra_args=args)

    try:
        for name in ("alpha", "gamma", "beta"):
            register(name)
        add("alpha", (0, 2))
        add("gamma", (2, 4))
        swarm.wait_for_blocks(market.checkpoint, BLOCKS)
        env = api_env(
            home=market.home,
            database_url=f"sqlite:///{home / 'api.db'}",
            broker_url=f"sqla+sqlite:///{home / 'api-broker.db'}",
            model=market.checkpoint,
            peers=swarm.initial_peers,
            ledger_url=market.ledger_url,
            price_margin=str(MARGIN),
        )
        api = ApiProcess(env=env, log_dir=home / "api")
        try:
            yield swarm, api, env, add
        finally:
            api.stop()
    finally:
        swarm.close()


def accepted_receipts(market, nodes) -> list:
    """The receipts of ``nodes`` the gateway accepted: countersigned by it, in the ledger's database."""
    from sqlalchemy import select

    from nectar.ledger.models import Receipt
    from nectar.service.db import get_engine, session_scope

    addresses = {node.eth_address.lower() for node in nodes}
    with session_scope(get_engine(f"sqlite:///{market.home / 'ledger.db'}")) as session:
        rows = session.scalars(select(Receipt).where(Receipt.client_signature.is_not(None))).all()
        return [
            (r.node.lower(), r.step, int(r.amount))
            for r in rows
            if r.node.lower() in addresses and r.client.lower() == market.gateway.lower()
        ]


def settled_receipts(market, nodes) -> int:
    """Their sum, once the gateway's posts have all reached the ledger (the sum stopped moving)."""
    last, stable_since = None, time.monotonic()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        total = sum(amount for _, _, amount in accepted_receipts(market, nodes))
        if total != last:
            last, stable_since = total, time.monotonic()
        elif time.monotonic() - stable_since > 6:
            return total
        time.sleep(1)
    return last


def add_tuned_model(api_env_, market, account_id: int, pre_seq_len: int = 4) -> str:
    """A fine-tuned model of the account, as a finished job saves it (trained soft prompts), without the training."""
    from nectar.api import crud
    from nectar.models import load_config
    from nectar.service.db import get_engine, session_scope

    hidden = load_config(market.checkpoint).hidden_size
    buffer = io.BytesIO()
    state = {"prompt_embeddings": 0.02 * torch.randn(pre_seq_len, hidden, generator=torch.Generator().manual_seed(1))}
    torch.save({"tuning_mode": "ptune", "pre_seq_len": pre_seq_len, "model": market.model, "state": state}, buffer)
    name = f"ft:{market.model}:pricing:{account_id}"
    with session_scope(get_engine(api_env_["NECTAR_API_DATABASE_URL"])) as session:
        crud.save_tuned_model(
            session,
            name=name,
            account_id=account_id,
            job_id="ftjob-pricing",
            base_model=market.model,
            tuning_mode="ptune",
            pre_seq_len=pre_seq_len,
            prompts=buffer.getvalue(),
        )
    return name


def one_request(client, rng: random.Random, model: str, tuned: str) -> None:
    n, stream = rng.randint(1, 4), rng.random() < 0.5
    options = dict(n=n, max_tokens=rng.randint(1, 16), temperature=rng.choice([0.0, 0.9]), seed=rng.randint(0, 99))
    if rng.random() < 0.4:
        options["stop"] = rng.choice([[" the"], ["."], ["e", "a"]])
    if stream:
        options.update(stream=True, stream_options={"include_usage": True})
    if rng.random() < 0.3:
        answer = client.completions.create(model=tuned, prompt="Once upon a time", **options)
    elif rng.random() < 0.5:
        answer = client.completions.create(model=model, prompt=rng.choice(["The quick brown fox", "Hello"]), **options)
    else:
        messages = [{"role": "user", "content": rng.choice(["Hi!", "Tell me a story about a cat."])}]
        answer = client.chat.completions.create(model=model, messages=messages, **options)
    if stream:
        chunks = list(answer)
        assert chunks[-1].usage is not None and float(chunks[-1].usage.cost) > 0
    else:
        assert answer.usage.total_tokens > 0 and float(answer.usage.cost) > 0


def test_users_pay_at_least_the_nodes_receipts_plus_margin_failovers_included(priced, market):
    swarm, api, env, add = priced
    customer = new_customer(api, credits="50")
    tuned = add_tuned_model(env, market, customer.account_id)
    client = customer.openai(max_retries=0, timeout=300)
    rng = random.Random(24)
    balances = []
    for _ in range(12):
        one_request(client, rng, market.model, tuned)
        account = customer.account()
        balances.append((account["balance_micro"], account["held_micro"]))
    # the failover: a spare for gamma's blocks joins (announcing a low throughput, so routes keep using gamma), then
    # gamma is killed while a long generation streams through it; the gateway replays the session to the spare
    beta = add("beta", (2, 4), throughput="1")
    wait_for(lambda: _announced(swarm, market, beta), 60, "the spare's announcement")
    gamma = next(node for node in swarm.nodes if node.name == "gamma")
    stream = client.completions.create(
        model=market.model,
        prompt="A long story:",
        n=2,
        max_tokens=200,
        temperature=0.9,
        seed=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [next(stream)]
    swarm.kill(gamma)
    chunks += list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > len(chunks) // 4, "the generation did not go on"
    nodes = swarm.nodes
    receipts_wei = settled_receipts(market, nodes)
    by_beta = accepted_receipts(market, [beta])
    assert by_beta and min(step for _, step, _ in by_beta) == 0, "no failover replay reached the spare"
    rows = customer.usage()
    assert len(rows) == 13 and all(row["cost_micro"] > 0 for row in rows)
    charged = sum(row["cost_micro"] for row in rows)
    account = customer.account()
    assert account["held_micro"] == 0 and account["balance_micro"] == 50 * 10**6 - charged
    assert all(balance >= 0 and held == 0 for balance, held in balances) and account["balance_micro"] >= 0
    owed = math.ceil(receipts_wei * Fraction(str(MARGIN + 1)) / WEI_PER_MICRO)  # micro-credits, rounded up
    count = len(accepted_receipts(market, nodes))
    print(
        f"route pricing: {len(rows)} requests charged {charged} micro-credits; the nodes' {count} accepted receipts "
        f"cost {receipts_wei / WEI_PER_MICRO:.1f} micro-credits ({owed} with the margin); "
        f"{len(by_beta)} receipts of the failover's spare; a flat 10 micro-credits per token would have charged "
        f"{10 * sum(row['prompt_tokens'] + row['completion_tokens'] for row in rows)}"
    )
    assert charged >= owed  # the invariant: users pay at least the nodes' receipts x (1 + margin)


def _announced(swarm, market, node) -> bool:
    from nectar.models import model_id_of
    from nectar.wire.dht import ClientRuntime
    from nectar.wire.swarm import read_swarm

    runtime = ClientRuntime(swarm.initial_peers)
    try:
        view = read_swarm(runtime, model_id_of(market.checkpoint), BLOCKS)
        return any(info.eth_address.lower() == node.eth_address.lower() for info in view.blocks[2].values())
    finally:
        runtime.shutdown()


def test_a_route_above_the_operator_cap_is_refused_at_no_cost(priced, market, tmp_path_factory):
    swarm, _, env, _ = priced
    home = tmp_path_factory.mktemp("capped-api")
    capped_env = {
        **env,
        "NECTAR_API_DATABASE_URL": f"sqlite:///{home / 'api.db'}",
        "NECTAR_API_BROKER_URL": f"sqla+sqlite:///{home / 'api-broker.db'}",
        "NECTAR_API_MAX_ROUTE_PRICE": str(BLOCKS * PRICE - 1),
    }
    capped = ApiProcess(env=capped_env, log_dir=home / "api")
    try:
        customer = new_customer(capped, credits="5")
        before = sum(amount for _, _, amount in accepted_receipts(market, swarm.nodes))
        with pytest.raises(openai.APIStatusError) as refused:
            customer.openai(max_retries=0).completions.create(model=market.model, prompt="Hello", max_tokens=4)
        assert refused.value.status_code == 503 and refused.value.body["code"] == "route_too_expensive"
        message = refused.value.body["message"]
        assert f"costs {BLOCKS * PRICE} credit wei per token" in message and "nothing was charged" in message
        with httpx.Client(base_url=capped.url, headers={"Authorization": f"Bearer {customer.key}"}) as h:
            streamed = h.post(
                "/v1/chat/completions",
                json={"model": market.model, "messages": [{"role": "user", "content": "hi"}], "stream": True},
            )
        assert streamed.status_code == 503
        account = customer.account()
        assert (account["balance_micro"], account["held_micro"], account["requests"]) == (5 * 10**6, 0, 0)
        time.sleep(3)  # anything the gateway had sent would have been posted by now
        assert sum(amount for _, _, amount in accepted_receipts(market, swarm.nodes)) == before
    finally:
        capped.stop()
