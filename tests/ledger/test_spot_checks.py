"""Spot checks on real span computations: a node corrupting 10% of its outputs is caught, honest nodes never are."""

from __future__ import annotations

import os
import random

import pytest
import torch
from sqlalchemy import select

from nectar.deployment import domain_from_deployment
from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.intake import check_receipt
from nectar.ledger.migrations import run_migrations
from nectar.ledger.spot_check import (
    AuditedStep,
    AuditFailed,
    AuditSource,
    LocalVerifier,
    SpotChecker,
    Verifier,
    epoch_seed,
    is_picked,
)
from nectar.models import load_span
from nectar.models.tiny import save_tiny_checkpoint
from nectar.service.db import get_engine, session_scope
from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as R
from tests.ledger.utils import Party

MODEL = "tiny-audit-llama"
SESSIONS, DECODE_STEPS, PREFILL = 12, 5, 6


class MemoryAudit(AuditSource):
    """What the node's audit RPC serves, kept in process: each session's inputs in order per node, and each step's
    output as sent."""

    def __init__(self):
        self.inputs: dict[tuple, list[torch.Tensor]] = {}
        self.outputs: dict[tuple, torch.Tensor] = {}

    def record(self, node: str, session_id: bytes, step: int, hidden: torch.Tensor, output: torch.Tensor):
        self.inputs.setdefault((node, session_id), []).append((step, hidden.clone()))
        self.outputs[node, session_id, step] = output.clone()

    def input_history(self, receipt):
        steps = self.inputs.get((receipt.node, receipt.session_id), [])
        parts = [t for s, t in steps if s <= receipt.step]
        return torch.cat(parts, dim=1) if parts else None

    def audited_step(self, receipt):
        history = self.input_history(receipt)
        output = self.outputs.get((receipt.node, receipt.session_id, receipt.step))
        return None if history is None else AuditedStep(history, output)


class SimulatedNode:
    """Serves inference steps of blocks [start, end) with a KV cache, signs receipts; may corrupt some outputs."""

    def __init__(self, path, start, end, *, cheat_rate=0.0, seed=0):
        self.party, self.span = Party(), load_span(path, start, end)
        self.start, self.end, self.cheat_rate, self.rng = start, end, cheat_rate, random.Random(seed)

    def serve_session(self, client, audit, inputs_per_step, session_id, *, model=MODEL):
        cache = self.span.new_cache(1, 64)
        signed = []
        for step, hidden in enumerate(inputs_per_step):
            output = self.span(hidden, cache=cache)
            if self.rng.random() < self.cheat_rate:  # skip the work: return a perturbed guess
                output = output + 0.05 * output.abs().amax() * torch.randn_like(output)
            audit.record(self.party.address, session_id, step, hidden, output)
            fp = fingerprints.ComputeSpec("float32").encode()
            receipt = R.Receipt(
                session_id=session_id,
                step=step,
                kind=0,
                model_id=R.model_id_hash(model),
                block_start=self.start,
                block_end=self.end,
                node=self.party.address,
                client=client.address,
                tokens=hidden.shape[1],
                price=3,
                amount=3 * hidden.shape[1],
                input_commitment=fingerprints.commit_tensor(hidden),
                output_commitment=fingerprints.commit_tensor(output),
                fingerprint=fingerprints.fingerprint_hash(fp),
                timestamp=1,
            )
            item = eip712.sign_receipt(receipt, self.party.key, domain_from_deployment())
            signed.append((item, fp, output))
        return signed


class BrokenVerifier(Verifier):
    """A faulty verifier (bad hardware): its outputs are off, which must not get an honest node accused."""

    name = "broken"

    def __init__(self, inner):
        self.inner = inner

    def execute(self, receipt, history, compute, prompts=None):
        out = self.inner.execute(receipt, history, compute, prompts=prompts)
        return out + 0.1 * out.abs().amax() * torch.randn_like(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("spot")
    path = save_tiny_checkpoint(root / MODEL, "llama", num_layers=4, hidden_size=64)
    settings = Settings(
        database_url=f"sqlite:///{root / 'ledger.db'}", spot_check_fraction=1.0, deployment_path=root / "none.json"
    )
    run_migrations(settings.database_url)
    engine = get_engine(settings.database_url)
    audit, client = MemoryAudit(), Party()
    honest_a, honest_b = SimulatedNode(path, 0, 2, seed=1), SimulatedNode(path, 2, 4, seed=2)
    cheater = SimulatedNode(path, 0, 2, cheat_rate=0.10, seed=3)
    torch.manual_seed(0)
    corrupted_leaves, all_items = set(), []
    with torch.no_grad():
        for _ in range(SESSIONS):
            steps = [torch.randn(1, PREFILL, 64)] + [torch.randn(1, 1, 64) for _ in range(DECODE_STEPS)]
            session_id = os.urandom(32)
            first_hop = honest_a.serve_session(client, audit, steps, session_id)
            all_items += first_hop
            # the second hop's inputs are the first hop's outputs: receipts chain by commitment
            all_items += honest_b.serve_session(client, audit, [out for _, _, out in first_hop], session_id)
            all_items += cheater.serve_session(client, audit, steps, os.urandom(32))
        # which of the cheater's steps were corrupted: recompute honestly from the same inputs
        honest_ref = load_span(path, 0, 2)
        for item, fp, out in all_items:
            if item.receipt.node != cheater.party.address:
                continue
            history = audit.input_history(item.receipt)
            expected = honest_ref(history)[:, -item.receipt.tokens :]
            if not torch.allclose(expected, out, atol=1e-4, rtol=1e-4):
                corrupted_leaves.add(eip712.receipt_leaf(item.receipt))
    with session_scope(engine) as session:
        checked = [check_receipt(item, fp, domain_from_deployment()) for item, fp, _ in all_items]
        verdicts = crud.store_receipts(session, checked=checked)
        assert all(v[0] == "accepted" for v in verdicts)
        epoch = crud.close_epoch(session)
    verifiers = [LocalVerifier({MODEL: path}, name="a"), LocalVerifier({MODEL: path}, name="b")]
    return dict(
        settings=settings,
        engine=engine,
        audit=audit,
        verifiers=verifiers,
        epoch=epoch.number,
        honest=[honest_a.party.address, honest_b.party.address],
        cheater=cheater.party.address,
        corrupted=corrupted_leaves,
        path=path,
        items=all_items,
    )


def test_chained_commitments_across_hops(world):
    items = world["items"]
    by_session = {}
    for item, _, _ in items:
        by_session.setdefault((item.receipt.session_id, item.receipt.step), []).append(item.receipt)
    chained = sum(
        1
        for receipts in by_session.values()
        for a in receipts
        for b in receipts
        if a.block_end == b.block_start and a.output_commitment == b.input_commitment
    )
    assert chained == SESSIONS * (DECODE_STEPS + 1)


def test_cheater_caught_and_honest_nodes_never_accused(world):
    checker = SpotChecker(
        settings=world["settings"], engine=world["engine"], verifiers=world["verifiers"], audit=world["audit"]
    )
    report = checker.check_epoch(world["epoch"])
    with session_scope(world["engine"]) as session:
        checks = crud.spot_checks_of(session, epoch=world["epoch"])
        leaf_of = {c.receipt_id: session.get(crud.Receipt, c.receipt_id).leaf for c in checks}
        honest_checks = [c for c in checks if c.node in world["honest"]]
        cheater_checks = [c for c in checks if c.node == world["cheater"]]
        caught = {leaf_of[c.receipt_id] for c in cheater_checks if c.status == "failed"}
        false_accusations = [c for c in honest_checks if c.status != "passed"]
        cheater_row = crud.get_node(session, address=world["cheater"])
        honest_rows = [crud.get_node(session, address=a) for a in world["honest"]]
    print(
        f"\nspot checks: {len(checks)} run; honest nodes {len(honest_checks)} checks, "
        f"{len(false_accusations)} accused; cheater corrupted {len(world['corrupted'])} of {len(cheater_checks)} "
        f"steps, {len(caught)} caught"
    )
    assert report.checked == len(checks) == 3 * SESSIONS * (DECODE_STEPS + 1)
    assert not false_accusations
    assert world["corrupted"] and caught == world["corrupted"]  # every corrupted step, and only those
    assert report.failed_nodes == [world["cheater"]]
    assert cheater_row.spot_failed == len(caught) and all(r.spot_failed == 0 for r in honest_rows)
    from nectar.ledger.reputation import score_node

    cheater_score = score_node(cheater_row, reference_stake=1).score
    assert all(score_node(r, reference_stake=1).score > 10 * cheater_score for r in honest_rows)


def test_a_faulty_verifier_does_not_get_an_honest_node_accused(world):
    broken = BrokenVerifier(world["verifiers"][0])
    checker = SpotChecker(
        settings=world["settings"],
        engine=world["engine"],
        audit=world["audit"],
        verifiers=[broken, world["verifiers"][1]],
    )
    with session_scope(world["engine"]) as session:
        ids = [c.receipt_id for c in crud.spot_checks_of(session, epoch=world["epoch"]) if c.node in world["honest"]][
            :10
        ]
    verdicts = [checker.check_receipt(i) for i in ids]
    assert all(v.status == "passed" and v.executions == 3 and "overruled" in v.detail for v in verdicts)


def test_picks_are_a_fraction_q_and_depend_on_the_secret():
    root, leaves = os.urandom(32), [os.urandom(32) for _ in range(20000)]
    seed_a, seed_b = epoch_seed(root, "secret-a"), epoch_seed(root, "secret-b")
    picked_a = {leaf for leaf in leaves if is_picked(seed_a, leaf, 0.05)}
    picked_b = {leaf for leaf in leaves if is_picked(seed_b, leaf, 0.05)}
    assert 800 < len(picked_a) < 1200 and 800 < len(picked_b) < 1200
    assert len(picked_a & picked_b) < 150  # independent draws overlap ~q^2 * n = 50


class FabricatingAudit(AuditSource):
    """A node answering audits with a made-up context: the step's own inputs are real, everything before is not."""

    def __init__(self, inner: MemoryAudit):
        self.inner = inner

    def audited_step(self, receipt):
        real = self.inner.audited_step(receipt)
        positions = receipt.tokens // real.history.shape[0]
        fake = torch.randn_like(real.history[:, :-positions])
        return AuditedStep(torch.cat([fake, real.history[:, -positions:]], dim=1), real.outputs)


def test_a_fabricated_history_prefix_is_refused(world):
    items = [
        item for item, _, _ in world["items"] if item.receipt.node == world["honest"][0] and item.receipt.step >= 2
    ]
    receipt = items[0].receipt
    with session_scope(world["engine"]) as session:
        stored_fp = session.scalar(
            select(crud.Receipt.fingerprint).where(crud.Receipt.leaf == eip712.receipt_leaf(receipt))
        )
    honest = SpotChecker(
        settings=world["settings"], engine=world["engine"], verifiers=world["verifiers"], audit=world["audit"]
    )
    assert honest._prefix_consistent(receipt, world["audit"].input_history(receipt)) is True
    lying = SpotChecker(
        settings=world["settings"],
        engine=world["engine"],
        verifiers=world["verifiers"],
        audit=FabricatingAudit(world["audit"]),
    )
    verdict = lying._judge(receipt, stored_fp)
    assert verdict.status == "failed" and "fabricated" in verdict.detail  # the node's own answer: its failure


def test_a_receipt_naming_a_model_nobody_knows_fails_its_spot_check(world):
    """Issue 21: a node signing a model id no node announces and no verifier hosts cannot be checked; that is the
    node's doing (it signed it), so the check fails instead of ending inconclusive at no cost."""
    node, client = SimulatedNode(world["path"], 0, 2, seed=9), Party()
    with torch.no_grad():
        items = node.serve_session(client, world["audit"], [torch.randn(1, 3, 64)], os.urandom(32), model="nobody")
    with session_scope(world["engine"]) as session:
        verdicts = crud.store_receipts(
            session, checked=[check_receipt(item, fp, domain_from_deployment()) for item, fp, _ in items]
        )
        assert [v[0] for v in verdicts] == ["accepted"]
        crud.close_epoch(session)
        receipt_id = session.scalar(
            select(crud.Receipt.id).where(crud.Receipt.leaf == eip712.receipt_leaf(items[0][0].receipt))
        )
    checker = SpotChecker(
        settings=world["settings"], engine=world["engine"], verifiers=world["verifiers"], audit=world["audit"]
    )
    verdict = checker.check_receipt(receipt_id)
    assert verdict.status == "failed" and "no node announces" in verdict.detail, verdict
    with session_scope(world["engine"]) as session:
        assert crud.get_node(session, address=node.party.address).spot_failed == 1


class PromptedAudit(MemoryAudit):
    """A node's audit answers with the deep prompts its sessions' first steps carried (or claims to have had)."""

    def __init__(self):
        super().__init__()
        self.prompts_of: dict[tuple, torch.Tensor] = {}

    def prompts(self, receipt):
        return self.prompts_of.get((receipt.node, receipt.session_id))


def test_deep_prompts_are_recomputed_so_claiming_them_dodges_nothing(world):
    """Issue 21: an audit answer with deep prompts used to end "inconclusive" (verifiers could not add them), so a
    cheater could dodge any audit by claiming prompts. Verifiers now compute with the prompts the node reveals (cut to
    the first step's positions, where a node adds them): an honest prompted session passes, a corrupted step whose
    node invents prompts fails."""
    audit, client = PromptedAudit(), Party()
    honest, liar = SimulatedNode(world["path"], 0, 2, seed=11), SimulatedNode(world["path"], 0, 2, seed=12)
    prompts = torch.randn(2, 1, 5, 64)  # 5 prompt positions, longer than the 3-token first step: only 3 are added
    steps = [torch.randn(1, 3, 64), torch.randn(1, 1, 64), torch.randn(1, 1, 64)]
    items = []
    with torch.no_grad():
        for node in (honest, liar):
            session_id, cache = os.urandom(32), node.span.new_cache(1, 16)
            for step, hidden in enumerate(steps):
                output = node.span(hidden, cache=cache, prompts=prompts if node is honest and step == 0 else None)
                if node is liar and step == 2:
                    output = output + 0.05 * output.abs().amax() * torch.randn_like(output)
                audit.record(node.party.address, session_id, step, hidden, output)
                fp = fingerprints.ComputeSpec("float32").encode()
                receipt = R.Receipt(
                    session_id=session_id,
                    step=step,
                    kind=0,
                    model_id=R.model_id_hash(MODEL),
                    block_start=0,
                    block_end=2,
                    node=node.party.address,
                    client=client.address,
                    tokens=hidden.shape[1],
                    price=3,
                    amount=3 * hidden.shape[1],
                    input_commitment=fingerprints.commit_tensor(hidden),
                    output_commitment=fingerprints.commit_tensor(output),
                    fingerprint=fingerprints.fingerprint_hash(fp),
                    timestamp=1,
                )
                items.append((eip712.sign_receipt(receipt, node.party.key, domain_from_deployment()), fp))
            # the liar never had prompts: it claims some to dodge the audit of its corrupted step
            audit.prompts_of[(node.party.address, session_id)] = prompts if node is honest else torch.randn(2, 1, 2, 64)
    with session_scope(world["engine"]) as session:
        verdicts = crud.store_receipts(
            session, checked=[check_receipt(i, fp, domain_from_deployment()) for i, fp in items]
        )
        assert all(v[0] == "accepted" for v in verdicts)
        crud.close_epoch(session)
        ids = {
            (item.receipt.node, item.receipt.step): session.scalar(
                select(crud.Receipt.id).where(crud.Receipt.leaf == eip712.receipt_leaf(item.receipt))
            )
            for item, _ in items
        }
    checker = SpotChecker(settings=world["settings"], engine=world["engine"], verifiers=world["verifiers"], audit=audit)
    for step in range(3):
        verdict = checker.check_receipt(ids[(honest.party.address, step)])
        assert verdict.status == "passed", (step, verdict)
    assert checker.check_receipt(ids[(liar.party.address, 2)]).status == "failed"


class WithholdingAudit(AuditSource):
    """A node answering audits with the step's inputs but not its output, or with another output than it sent."""

    def __init__(self, inner: MemoryAudit, swap: bool):
        self.inner, self.swap = inner, swap

    def audited_step(self, receipt):
        real = self.inner.audited_step(receipt)
        return AuditedStep(real.history, real.outputs + 1e-3 if self.swap else None)


@pytest.mark.parametrize("swap", [False, True])
def test_an_output_withheld_or_swapped_at_audit_time_fails_the_step(world, swap):
    """The node signed a hash of its whole output: it must reveal exactly that, or the step fails (no recomputation
    can make up for an output the node will not show, and no other output is compared)."""
    item = next(item for item, _, _ in world["items"] if item.receipt.node == world["honest"][0])
    descriptor = fingerprints.ComputeSpec("float32").encode()
    checker = SpotChecker(
        settings=world["settings"],
        engine=world["engine"],
        verifiers=world["verifiers"],
        audit=WithholdingAudit(world["audit"], swap),
    )
    verdict = checker._judge(item.receipt, descriptor)
    assert verdict.status == "failed" and verdict.executions == 0
    assert ("output commitment" if swap else "not its output") in verdict.detail


class ShoutingAudit(AuditSource):
    """A node refusing its audit with a megabyte of error text (a failed audit quotes the node's answer)."""

    def audited_step(self, receipt):
        raise AuditFailed(f"node {receipt.node} answered the audit with bad_request: " + "x" * 2**20)


def test_a_nodes_audit_answer_is_quoted_short_in_the_verdict_its_row_and_the_log(world):
    item = next(item for item, _, _ in world["items"] if item.receipt.node == world["honest"][0])
    checker = SpotChecker(
        settings=world["settings"], engine=world["engine"], verifiers=world["verifiers"], audit=ShoutingAudit()
    )
    verdict = checker._judge(item.receipt, fingerprints.ComputeSpec("float32").encode())
    assert verdict.status == "failed" and "more characters" in verdict.detail and len(verdict.detail) < 1600


def test_a_step_computed_with_a_lora_adapter_is_never_judged_against_the_base_model(world):
    """Its descriptor binds the adapter's digest; verifiers hold no adapters yet, so recomputing the base model would
    accuse an honest node: the check ends inconclusive without asking the node or any verifier."""
    item = next(item for item, _, _ in world["items"] if item.receipt.node == world["honest"][0])
    descriptor = fingerprints.ComputeSpec("float32", adapter=bytes(range(32))).encode()
    assert fingerprints.ComputeSpec.decode(descriptor).adapter == bytes(range(32))
    checker = SpotChecker(
        settings=world["settings"], engine=world["engine"], verifiers=world["verifiers"], audit=world["audit"]
    )
    verdict = checker._judge(item.receipt, descriptor)
    assert (verdict.status, verdict.executions) == ("inconclusive", 0) and "adapter" in verdict.detail
