"""Live swarm, issue 21 item 1: honest `--dtype bfloat16` nodes are never accused; a bfloat16 cheater still is.

Four staked nodes serve the same blocks of a tiny Llama in bfloat16; one corrupts 30% of its outputs. Clients
generate through each; the worker audits every step (q = 1) over the swarm: inputs and the step's output from the
node's audit RPC, re-execution on OTHER nodes announcing the precision the receipt commits to. Before, verifiers
recomputed in float32 and judged a bfloat16 node with float32's tolerance: most of its steps "failed".
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from nectar.ledger import crud
from nectar.service.db import session_scope
from nectar.wire.fingerprints import ComputeSpec
from tests.ledger.market import SwarmMarket
from tests.ledger.test_swarm_spot_checks import Prefer, wait_for_spot_checks

pytestmark = pytest.mark.slow
PRICE = 10**12
SESSIONS_PER_NODE, NEW_TOKENS = 4, 8
BF16 = ("--dtype", "bfloat16")


@pytest.fixture(scope="module")
def market(tmp_path_factory, contracts_snapshot, monkeypatch_module):
    home = tmp_path_factory.mktemp("market-bf16")
    market = SwarmMarket(home, price=PRICE, model_name="tiny-bf16-swarm-llama")
    market.models = []
    try:
        monkeypatch_module.setenv("NECTAR_DEPLOYMENT", str(market.deployment.deployment_path))
        market.deployment.start_ledger()
        market.honest = [market.add_node(f"honest-{i}", (0, 4), account=i, extra_args=BF16) for i in range(3)]
        market.cheater = market.add_node("cheater", (0, 4), extra_args=BF16 + ("--corrupt-rate", "0.3"))
        market.wait_for_swarm(min_nodes=4)
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


def test_honest_bfloat16_nodes_pass_every_swarm_audit_and_the_cheater_fails(market):
    prefer = Prefer()
    model = market.client_model(market.clients[0], scorer=prefer)
    market.models.append(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(SESSIONS_PER_NODE):
        for node in market.honest + [market.cheater]:
            prefer.target = node.eth_address
            model.generate(
                torch.randint(3, 1000, (1, 5), generator=generator), max_new_tokens=NEW_TOKENS, eos_token_id=[]
            )
    per_node = Counter(r.receipt.node for r in model.wallet.receipts)
    assert set(per_node.values()) == {SESSIONS_PER_NODE * NEW_TOKENS}, per_node
    market.wait_for_payments(model.wallet)
    number = market.close_and_settle()["number"]

    rows = wait_for_spot_checks(market, number, 600)
    with session_scope(market.engine) as session:
        descriptors = {r.fingerprint for r in crud.list_receipts(session, epoch=number, limit=10_000)}
    assert {ComputeSpec.decode(d) for d in descriptors} == {ComputeSpec("bfloat16", "none", "cpu")}
    honest = {n.eth_address for n in market.honest}
    accused = [r for r in rows if r["node"] in honest and r["status"] != "passed"]
    cheater_rows = [r for r in rows if r["node"] == market.cheater.eth_address]
    failed = [r for r in cheater_rows if r["status"] == "failed"]
    print(
        f"\nbfloat16 swarm audits: {len(rows)} checked; honest {len(rows) - len(cheater_rows)} checks, "
        f"{len(accused)} accused; cheater {len(cheater_rows)} checks, {len(failed)} failed"
    )
    assert len(rows) == sum(per_node.values())
    assert not accused, accused[:3]
    assert failed and all("bfloat16" in r["detail"] for r in failed)
