"""Live swarm, issue 21: the pooled (sequential) audit test over real nodes. Honest `--dtype bfloat16` nodes are
scored on every audited step and never convicted; a bfloat16 node adding noise of 3% of the mean magnitude to every
output passes each step on its own (its tolerance is 5.2% for 4 blocks; scores about 1.7 at 2%, which takes about 25
audited steps) and is convicted by the pooled test, with the same case on chain as any failed audit.

The worker audits every step (q = 1) over the swarm: the node's audit RPC gives the step's inputs and output, OTHER
nodes announcing bfloat16 re-run it, and two float32 nodes give the float32 recomputations the pooled score needs
(one per verifier, so the conviction's confirmation is independent too).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from sqlalchemy import select

from nectar.ledger.models import PooledAudit
from nectar.service.db import session_scope
from tests.ledger.market import SwarmMarket
from tests.ledger.test_swarm_spot_checks import Prefer, wait_for_spot_checks

pytestmark = pytest.mark.slow
PRICE = 10**12
SESSIONS_PER_NODE, NEW_TOKENS = 4, 8
BF16 = ("--dtype", "bfloat16")


@pytest.fixture(scope="module")
def market(tmp_path_factory, contracts_snapshot, monkeypatch_module):
    home = tmp_path_factory.mktemp("market-pooled")
    market = SwarmMarket(home, price=PRICE, model_name="tiny-pooled-swarm-llama")
    market.models = []
    try:
        monkeypatch_module.setenv("NECTAR_DEPLOYMENT", str(market.deployment.deployment_path))
        market.deployment.start_ledger()
        market.honest = [market.add_node(f"honest-{i}", (0, 4), account=i, extra_args=BF16) for i in range(2)]
        market.reference = [market.add_node("float32-0", (0, 4), account=2), market.add_node("float32-1", (0, 4))]
        market.cheater = market.add_node(
            "cheater", (0, 4), extra_args=BF16 + ("--corrupt-rate", "1.0", "--corrupt-scale", "0.03")
        )
        market.wait_for_swarm(min_nodes=5)
        market.deployment.start_worker(
            audit_source="swarm",
            spot_check_verifier="swarm",
            spot_check_fraction=1.0,
            swarm_initial_peers=market.swarm.initial_peers[0],
            slash_poll_seconds=1,
        )
        market.fund(market.clients[0], 10**18)
        yield market
    finally:
        for model in market.models:
            model.shutdown()
        market.stop()


def test_the_pooled_test_convicts_a_small_noise_bfloat16_node_and_no_honest_one(market):
    prefer = Prefer()
    model = market.client_model(market.clients[0], scorer=prefer)
    market.models.append(model)
    generator = torch.Generator().manual_seed(0)
    nodes = market.honest + [market.cheater]
    for _ in range(SESSIONS_PER_NODE):
        for node in nodes:
            prefer.target = node.eth_address
            model.generate(
                torch.randint(3, 1000, (1, 5), generator=generator), max_new_tokens=NEW_TOKENS, eos_token_id=[]
            )
    per_node = Counter(r.receipt.node for r in model.wallet.receipts)
    assert set(per_node.values()) == {SESSIONS_PER_NODE * NEW_TOKENS}, per_node
    market.wait_for_payments(model.wallet)
    number = market.close_and_settle()["number"]

    rows = wait_for_spot_checks(market, number, 900)
    honest = {n.eth_address for n in market.honest}
    accused = [r for r in rows if r["node"] in honest and r["status"] != "passed"]
    cheater_rows = [r for r in rows if r["node"] == market.cheater.eth_address]
    convicted = [r for r in cheater_rows if r["status"] == "failed"]
    with session_scope(market.engine) as session:
        states = {s.node: (s.steps, s.convictions) for s in session.scalars(select(PooledAudit))}
    print(
        f"\npooled swarm audits: {len(rows)} checked; honest {sum(r['node'] in honest for r in rows)} checks, "
        f"{len(accused)} accused; cheater {len(cheater_rows)} checks, {len(convicted)} convicted; states {states}"
    )
    assert not accused, accused[:3]
    # every honest bfloat16 step was scored against a float32 node's recomputation, and none convicted
    for address in honest:
        assert states[address] == (per_node[address], 0), states
    assert convicted and all(r["detail"].startswith("pooled test:") for r in convicted), cheater_rows[:2]
    # the same case path as a failed audit: the first conviction is the node's case of the epoch
    holder = min(convicted, key=lambda r: r["receipt_id"])
    assert holder["slash_status"] in ("unattested", "attested")
