"""Spot checks over the live swarm, slashing on chain, and reputation in routing.

Four staked nodes serve the same blocks of a tiny Llama; one of them (``--corrupt-rate 0.1``) corrupts a tenth of its
outputs, another (the evader, issue 21) does too and refuses the audits of the steps it corrupted. Clients generate
through all four; the epoch closes and the worker spot-checks every receipt (q = 1): the inputs come from each
node's audit RPC, the step is re-run on the OTHER nodes' forward RPC. Every corrupted step is caught and kept on
record, honest nodes are never accused; once the epoch's root is final (chain time advanced past the challenge
period) the cheater's first failure is attested on chain with its inclusion proof (one case per node and epoch), and
after the dispute window the worker's slash round slashes the cheater's stake once. Then a client routing with
``ReputationScorer`` sends the cheater (almost) no traffic while a brand-new node still gets some. The evader's
refusals count as failures: it is convicted and slashed like the cheater. Audits are private: the nodes answer signed
calls of the chain's verifiers only.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
import torch
from hivemind.p2p import PeerID

from nectar.client.routing import PeerScorer, ReputationScorer
from nectar.ledger import crud
from nectar.ledger.models import Epoch, Receipt
from nectar.ledger.spot_check import AuditFailed, LocalVerifier
from nectar.ledger.swarm import SwarmView
from nectar.ledger.swarm_audit import RpcAuditSource
from nectar.service.db import session_scope
from nectar.wire.announce import ServerInfo
from nectar.wire.eip712 import receipt_leaf
from nectar.wire.fingerprints import ComputeSpec, outputs_match
from nectar.wire.messages import AuditCall, AuditReply
from nectar.wire.protocol import ErrorCode, NodeRPCError, module_uid
from nectar.wire.receipts import model_id_hash
from tests.ledger.market import SwarmMarket
from tests.ledger.utils import Party, make_receipt, wait_for

pytestmark = pytest.mark.slow
PRICE = 10**12
SESSIONS_PER_NODE, NEW_TOKENS = 8, 10  # 80 inference steps per node: P(no corrupted step at 10%) = 0.9**80 < 0.03%


class Prefer(PeerScorer):
    """Test routing: send the next sessions to one chosen node (so every node gets customers)."""

    def __init__(self):
        self.target = None

    def cost_factor(self, peer_id: PeerID, info: ServerInfo) -> float:
        return 0.01 if info.eth_address == self.target else 1.0


@pytest.fixture(scope="module")
def market(tmp_path_factory, contracts_snapshot, monkeypatch_module):
    home = tmp_path_factory.mktemp("market-audit")
    market = SwarmMarket(home, price=PRICE, model_name="tiny-audit-swarm-llama")
    models = []
    try:
        monkeypatch_module.setenv("NECTAR_DEPLOYMENT", str(market.deployment.deployment_path))
        market.deployment.start_ledger()
        market.honest = [market.add_node("honest-a", (0, 4), account=0), market.add_node("honest-b", (0, 4), account=1)]
        market.cheater = market.add_node("cheater", (0, 4), account=2, extra_args=("--corrupt-rate", "0.1"))
        # a fresh key (the devnet has three node accounts), registered with the minimum stake all the same
        market.evader = market.add_node("evader", (0, 4), extra_args=("--corrupt-rate", "0.1", "--evade-audits"))
        market.wait_for_swarm(min_nodes=4)  # each registered with the minimum stake by add_node
        market.deployment.start_worker(
            audit_source="swarm",
            spot_check_verifier="swarm",
            spot_check_fraction=1.0,
            swarm_initial_peers=market.swarm.initial_peers[0],
            slash_poll_seconds=1,
            spot_check_audit_window_s=10,
        )
        for client in market.clients[:2]:
            market.fund(client, 10**18)
        market.models = models
        yield market
    finally:
        for model in models:
            model.shutdown()
        market.stop()


def spot_check_rows(market, epoch: int) -> list[dict]:
    with session_scope(market.engine) as session:
        return [
            {
                "node": c.node,
                "status": c.status,
                "leaf": session.get(Receipt, c.receipt_id).leaf,
                "slash_status": c.slash_status,
                "attest_tx": c.attest_tx_hash,
                "detail": c.detail,
                "receipt_id": c.receipt_id,
            }
            for c in crud.spot_checks_of(session, epoch=epoch)
        ]


def wait_for_spot_checks(market, number: int, timeout: float) -> list[dict]:
    """The spot checks of epoch ``number`` once the worker drew its seed and judged every one."""

    def done():
        with session_scope(market.engine) as session:
            seeded = session.get(Epoch, number).spot_seed is not None
        rows = spot_check_rows(market, number)
        return rows if seeded and rows and all(r["status"] != "pending" for r in rows) else None

    return wait_for(done, timeout, f"the spot checks of epoch {number} (see {market.home}/worker.log)", interval=2)


def verifier_key(market) -> str:
    return next(a["privateKey"] for a in market.chain.deployment.accounts if a["role"] == "verifier")


def corrupted_steps(market, receipts) -> set[bytes]:
    """Ground truth, independent of the worker: fetch each cheater step's inputs and output over the audit RPC and
    recompute the span locally in the receipt's precision; the leaves whose revealed output does not match."""
    view = SwarmView(market.swarm.initial_peers)
    try:
        audit, local = (
            RpcAuditSource(view, key=verifier_key(market)),
            LocalVerifier({market.model_name: market.model_path}, name="truth"),
        )
        found = set()
        for signed, descriptor in receipts:
            step, spec = audit.audited_step(signed.receipt), ComputeSpec.decode(descriptor)
            assert step is not None and step.outputs is not None, "the cheater's audit log lost a step"
            blocks = signed.receipt.block_end - signed.receipt.block_start
            if not outputs_match(step.outputs, local.execute(signed.receipt, step.history, spec), spec, blocks):
                found.add(receipt_leaf(signed.receipt))
        return found
    finally:
        view.shutdown()


def test_spot_checks_over_the_swarm_catch_the_cheater_and_never_accuse_honest_nodes(market):
    prefer, wallets = Prefer(), []
    generator = torch.Generator().manual_seed(0)
    for client in market.clients[:2]:
        model = market.client_model(client, scorer=prefer)
        market.models.append(model)
        wallets.append(model.wallet)
    for round_index in range(SESSIONS_PER_NODE):
        for index, node in enumerate(market.honest + [market.cheater, market.evader]):
            prefer.target = node.eth_address
            model = market.models[(round_index + index) % 2]
            # no EOS: a corrupted step sends the text somewhere random, where EOS (1 in 1000) could end it early
            model.generate(
                torch.randint(3, 1000, (1, 5), generator=generator), max_new_tokens=NEW_TOKENS, eos_token_id=[]
            )
    per_node = Counter(r.receipt.node for w in wallets for r in w.receipts)
    assert set(per_node.values()) == {SESSIONS_PER_NODE * NEW_TOKENS}, per_node
    for wallet in wallets:
        market.wait_for_payments(wallet)

    epoch = market.close_and_settle()
    number = epoch["number"]

    rows = wait_for_spot_checks(market, number, 600)
    cheater, honest, evader = (
        market.cheater.eth_address,
        {n.eth_address for n in market.honest},
        market.evader.eth_address,
    )
    assert len(rows) == sum(per_node.values()) == epoch["receipt_count"]  # q = 1: every customer step checked
    honest_rows = [r for r in rows if r["node"] in honest]
    cheater_rows = [r for r in rows if r["node"] == cheater]
    evader_rows = [r for r in rows if r["node"] == evader]
    accused = [r for r in honest_rows if r["status"] != "passed"]
    caught = {r["leaf"] for r in cheater_rows if r["status"] == "failed"}
    with session_scope(market.engine) as session:
        cheater_receipts = [
            (crud.signed_receipt_of(r), r.fingerprint)
            for r in crud.list_receipts(session, node=cheater, epoch=number, limit=10_000)
        ]
    truth = corrupted_steps(market, cheater_receipts)
    overruled = sum("overruled" in (r["detail"] or "") for r in rows)
    print(
        f"\nswarm spot checks, epoch {number}: {len(rows)} checked; honest nodes {len(honest_rows)} checks, "
        f"{len(accused)} accused; cheater {len(cheater_rows)} checks, {len(truth)} corrupted, {len(caught)} caught, "
        f"{sum(r['status'] == 'passed' for r in cheater_rows)} passed; {overruled} first-verifier disagreements "
        f"overruled; evader {len(evader_rows)} checks, {sum(r['status'] == 'failed' for r in evader_rows)} audits "
        f"refused and failed"
    )
    assert not accused, accused[:3]
    assert truth and caught == truth  # every corrupted step, and only those
    assert all(r["status"] == "passed" for r in cheater_rows if r["leaf"] not in truth)
    # issue 21: refusing the audit of a corrupted step is no way out: each refusal is a failure, not "inconclusive"
    evaded = [r for r in evader_rows if r["status"] == "failed"]
    assert evaded and all(r["status"] in ("passed", "failed") for r in evader_rows)
    assert all("did not answer the audit" in r["detail"] and "unknown_session" in r["detail"] for r in evaded)
    evader_holder = min(evaded, key=lambda r: r["receipt_id"])
    assert evader_holder["slash_status"] in ("unattested", "attested")
    assert all(r["slash_status"] == "covered" for r in evaded if r is not evader_holder)
    failed = [r for r in cheater_rows if r["status"] == "failed"]
    # issue 20: one case per node and epoch, and only on a final root: the first failure waits to be attested, the
    # others stay on record only
    holder = min(failed, key=lambda r: r["receipt_id"])
    assert holder["slash_status"] in ("unattested", "attested")
    assert all(r["slash_status"] == "covered" for r in failed if r is not holder)
    assert market.chain.spot_check_case(holder["leaf"])["node"] == "0x" + "00" * 20  # the root is not final yet
    market.chain.advance_time(market.chain.challenge_period())

    def attested():
        rows = [r for r in spot_check_rows(market, number) if r["leaf"] in (holder["leaf"], evader_holder["leaf"])]
        return all(r["slash_status"] == "attested" and r["attest_tx"] for r in rows)

    wait_for(attested, 120, f"the slash round to attest the cheaters' cases (see {market.home}/worker.log)")
    case = market.chain.spot_check_case(holder["leaf"])  # an open case on chain, waiting for its dispute window
    assert case["node"] == cheater and case["epoch"] == number
    assert case["attestations"] == 1 and case["readyAt"] > 0 and not case["closed"]
    assert market.chain.node_case_in_epoch(cheater, number) == holder["leaf"]
    assert all(market.chain.spot_check_case(r["leaf"])["attestations"] == 0 for r in failed if r is not holder)
    assert market.chain.spot_check_case(evader_holder["leaf"])["node"] == evader
    market.caught, market.epoch_number, market.case_leaf = caught, number, holder["leaf"]
    market.evaded, market.evader_case_leaf = evaded, evader_holder["leaf"]


def test_after_the_dispute_window_the_cheaters_stake_is_slashed_on_chain(market):
    cheater, evader = market.cheater.eth_address, market.evader.eth_address
    honest = [n.eth_address for n in market.honest]
    stake_before = {a: market.chain.stake_of(a) for a in honest + [cheater, evader]}
    assert market.chain.stake_of(cheater) == market.chain.deployment.params["min_stake"]
    window = market.chain.deployment.params["dispute_window"]
    market.chain.advance_time(window + 1)

    def slashed():
        rows = spot_check_rows(market, market.epoch_number)
        cases = (market.case_leaf, market.evader_case_leaf)
        return sum(r["leaf"] in cases and r["slash_status"] == "slashed" for r in rows) == 2

    wait_for(slashed, 120, f"the worker's slash round to finalize the cases (see {market.home}/worker.log)")
    # the evader lost as much as the cheater: refusing audits costs what failing them costs
    evader_events = market.chain.events("Slashing", "SpotCheckSlashed", filters={"node": evader})
    assert len(evader_events) == 1 and market.chain.stake_of(evader) < stake_before[evader]
    events = market.chain.events("Slashing", "SpotCheckSlashed", filters={"node": cheater})
    assert len(events) == 1  # one case per node and epoch: slashed once for the epoch, however many steps it faked
    slashed_total = sum(e["args"]["amount"] for e in events)
    assert slashed_total == stake_before[cheater] * market.chain.deployment.params["spot_check_slash_bps"] // 10_000
    assert market.chain.stake_of(cheater) == stake_before[cheater] - slashed_total
    assert all(market.chain.stake_of(a) == stake_before[a] for a in honest)
    reputation = {n["address"]: n for n in market.deployment.http().get("/v1/reputation").json()["nodes"]}
    assert reputation[cheater]["slashes"] == 1 and reputation[cheater]["spot_failed"] == len(market.caught)
    assert all(reputation[a]["spot_failed"] == 0 and reputation[a]["slashes"] == 0 for a in honest)
    # every failure on record still weighs on the score (x0.5 each), the one slash x0.25
    assert (
        reputation[cheater]["score"] <= 0.25 * 0.5 ** len(market.caught) < min(reputation[a]["score"] for a in honest)
    )
    print(
        f"\nslashed {cheater}: {len(events)} cases, stake {stake_before[cheater]} -> "
        f"{market.chain.stake_of(cheater)}; scores: cheater {reputation[cheater]['score']}, honest "
        f"{[reputation[a]['score'] for a in honest]}"
    )


def test_reputation_routing_starves_the_cheater_and_keeps_traffic_for_a_new_node(market):
    newcomer = market.add_node("newcomer", (0, 4))  # a fresh key: the ledger has never seen it
    market.wait_for_swarm(min_nodes=4)
    for client in market.clients[1:3]:  # escrow reserved for every node, the newcomer too
        market.fund(client, 10**17)
    scorer = ReputationScorer(market.url, exploration=0.3, seed=0)
    try:
        assert scorer.reputation(market.cheater.eth_address).penalized and scorer.is_new(newcomer.eth_address)
        assert scorer.reputation(market.evader.eth_address).penalized
        model = market.client_model(market.clients[2], scorer=scorer)
        market.models.append(model)
        sessions = 40
        for index in range(sessions):
            model.generate(
                torch.randint(3, 1000, (1, 4), generator=torch.Generator().manual_seed(index)), max_new_tokens=2
            )
        nodes_of_session: dict[bytes, set] = {}
        for r in model.wallet.receipts:
            nodes_of_session.setdefault(r.receipt.session_id, set()).add(r.receipt.node)
        by_node = Counter(node for nodes in nodes_of_session.values() for node in nodes)  # sessions each node served
    finally:
        scorer.close()
    names = {n.eth_address: n.name for n in market.swarm.nodes}
    print(
        f"\nreputation routing over {sessions} sessions, sessions served: "
        + ", ".join(f"{names[a]} {c}" for a, c in by_node.most_common())
    )
    assert len(nodes_of_session) == sessions
    assert by_node[market.cheater.eth_address] == 0 and by_node[market.evader.eth_address] == 0
    assert by_node[newcomer.eth_address] >= 1
    assert sum(by_node[n.eth_address] for n in market.honest) > sessions // 2


def test_an_unregistered_caller_gets_nothing_from_a_nodes_audit_call(market):
    """Issue 21: audit answers carry users' inputs (block 0's are their prompts' embeddings). A real node answers a
    call signed by the chain's verifier (which it learns through the ledger's /v1/verifiers) and refuses unsigned
    calls, calls signed by any other key, and a replay of the verifier's own call, with FORBIDDEN and no inputs."""
    node, prefer = market.honest[0], Prefer()
    prefer.target = node.eth_address
    model = market.client_model(market.clients[1], scorer=prefer)
    market.models.append(model)
    model.generate(torch.randint(3, 1000, (1, 4), generator=torch.Generator().manual_seed(7)), max_new_tokens=1)
    receipt = next(r.receipt for r in model.wallet.receipts if r.receipt.node == node.eth_address)
    view = SwarmView(market.swarm.initial_peers)
    try:
        entry = view.peer_of(node.eth_address, market.model_name)
        uid = module_uid(market.model_name, receipt.block_start, receipt.block_end)
        call = AuditCall(uid, bytes(receipt.session_id), int(receipt.step))

        def ask(request):
            return AuditReply.decode(view.call(entry.peer_id, call.rpc, request, timeout=30))

        def refused(request) -> str:
            with pytest.raises(Exception) as error:
                ask(request)
            assert NodeRPCError.code_of(error.value) == ErrorCode.FORBIDDEN, error.value
            return str(error.value)

        sign = dict(node=node.eth_address, peer_id=str(entry.peer_id))
        assert "registered verifiers only" in refused(call.to_request())
        stranger = "0x" + os.urandom(32).hex()
        assert "not a registered verifier" in refused(call.signed(stranger, **sign).to_request())
        signed = call.signed(verifier_key(market), **sign).to_request()
        answer = ask(signed)  # the verifier gets the inputs, once
        assert answer.inputs.shape[-1] == 64 and (answer.start, answer.end) == (receipt.block_start, receipt.block_end)
        assert "replayed" in refused(signed)
    finally:
        view.shutdown()


def test_a_node_away_for_the_whole_audit_window_fails_and_a_late_ledger_convicts_no_one(market):
    """Issue 21: an audit nobody answers is retried with backoff for the audit window, then fails (a node cannot
    evade by going away); once a node's window is spent its next audits fail without waiting again; and when the
    ledger itself comes later than nodes must keep their records, a missing answer is not the node's fault."""
    ghost = Party()  # signed receipts for the swarm's model, never announced in it
    view = SwarmView(market.swarm.initial_peers)
    try:
        audit = RpcAuditSource(view, key=verifier_key(market), window_s=3, retention_s=900)
        assert audit.knows_model(model_id_hash(market.model_name)) is True
        assert audit.knows_model(model_id_hash("nobody-serves-this")) is False
        receipt = make_receipt(ghost, market.clients[0], model=market.model_name)[0].receipt
        began = time.monotonic()
        with pytest.raises(AuditFailed, match="did not answer the audit") as error:
            audit.audited_step(receipt)
        assert time.monotonic() - began >= 3 and "3s audit window" in str(error.value)
        assert "attempt(s)" in str(error.value) and not str(error.value).startswith("1 attempt")
        began = time.monotonic()
        with pytest.raises(AuditFailed, match=r"\(1 attempt\(s\)"):  # its window is spent: no second wait
            audit.audited_step(make_receipt(ghost, market.clients[0], model=market.model_name, step=1)[0].receipt)
        assert time.monotonic() - began < 3
        late = make_receipt(ghost, market.clients[0], model=market.model_name, timestamp=int(time.time()) - 900)
        with pytest.raises(LookupError, match="too late"):
            RpcAuditSource(view, key=verifier_key(market), window_s=1).audited_step(late[0].receipt)
    finally:
        view.shutdown()
