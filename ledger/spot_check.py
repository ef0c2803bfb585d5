"""Spot checks: re-execute a secret random fraction q of an epoch's steps and catch nodes that return wrong outputs.

Picks are made after the epoch closes, from keccak(epoch root || ledger secret): a node signing a receipt knows
neither. For each pick the ``AuditSource`` supplies the step's input history (its last positions must hash to the
receipt's input commitment) and the step's whole output as the node sent it (it must hash to the receipt's output
commitment: the node cannot choose what is compared). A ``Verifier`` recomputes the span in the precision the
receipt commits to (its compute descriptor: dtype, quantization), and every coordinate is compared within that
precision's calibrated tolerance (``nectar.wire.fingerprints.outputs_match``). A disagreement goes to a third
execution: only when it sides with the verifier against the node is the node reported on chain
(``attest_spot_check_failure``) and its reputation cut. A third execution that sides with the node clears it, so an
honest node is never accused on a single verifier's word.

Every failure stays on record in the database; on chain a node gets one case per epoch (``nectar.ledger.slashing``):
its first failure of the epoch is attested, with the receipt's inclusion proof, once the epoch's root is final.
"""

from __future__ import annotations

import contextlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy import Engine, select

from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.models import Epoch, PooledAudit, Receipt, SpotCheck, utcnow
from nectar.service.db import session_scope
from nectar.wire.fingerprints import (
    POOLED_CUSUM,
    POOLED_DTYPES,
    ComputeSpec,
    commit_tensor,
    cusum_step,
    output_deviation,
    outputs_match,
    pooled_score,
    tolerance,
)
from nectar.wire.protocol import peer_text
from nectar.wire.receipts import Receipt as WireReceipt
from nectar.wire.receipts import ReceiptKind, keccak256, model_id_hash

logger = logging.getLogger(__name__)
MAX_DETAIL = 1500  # characters of a spot check's detail kept (it may quote 1,000 of the node's)

CHECKABLE_KINDS = (ReceiptKind.INFERENCE, ReceiptKind.FORWARD)  # a backward step needs its gradients: not sampled
POOLED_WINDOW = 64  # receipts of a run of excess kept (and cited) per node and descriptor


class AuditFailed(Exception):
    """The node failed its audit by its own doing: no answer within the audit window, a refusal, or an answer its
    own receipts contradict. Counts as a failed spot check (never "inconclusive": evading an audit must cost what
    failing it costs)."""


@dataclass
class AuditedStep:
    """What a node reveals for an audited step: its session's inputs up to the step ([B, L, H], rollbacks applied;
    the last ``tokens // B`` positions are the step's own input) and the step's output as it was sent."""

    history: torch.Tensor
    outputs: torch.Tensor | None


class AuditSource(ABC):
    """Where the inputs and output of a past step come from (the lead's implementation asks the node over RPC)."""

    @abstractmethod
    def audited_step(self, receipt: WireReceipt) -> AuditedStep | None:
        """The step's ``AuditedStep`` as the node kept it. None if unavailable for reasons that are not the node's
        fault; raises ``AuditFailed`` when the node is to blame."""

    def knows_model(self, model_id: bytes) -> bool | None:
        """Whether any node announces this model (None: this source cannot tell)."""
        return None

    def adapter(self, receipt: WireReceipt, digest: bytes) -> Path | None:
        """A folder holding the LoRA adapter of ``digest`` that the receipt's step was computed with, obtained from
        the node that signed it and checked against the digest. None: this source cannot ask nodes (the step stays
        unjudged); raises ``AuditFailed`` when the node does not hand it over, or hands over other or oversize files
        (it holds the files it computed with: keeping them from the ledger is evading the audit)."""
        return None

    def prompts(self, receipt: WireReceipt) -> torch.Tensor | None:
        """The deep prompts ``[blocks, B or 1, P, H]`` the session's first step carried, as the node revealed them with
        the last ``audited_step`` of this receipt (None: none)."""
        return None


class Verifier(ABC):
    """Recomputes a span's output for a step from its full input history, in the node's precision."""

    name: str = "verifier"

    def hosts(self, model_id: bytes) -> bool | None:
        """Whether this verifier can run the model (None: it cannot tell before trying)."""
        return None

    def holds_adapter(self, digest: bytes) -> bool:
        """Whether it can recompute steps made with the LoRA adapter of this digest (``ComputeSpec.adapter``)."""
        return False

    def add_adapter(self, digest: bytes, folder: Path) -> None:
        """Recompute steps made with the adapter of ``digest`` from ``folder`` (checked against it already); a
        verifier that cannot take adapters ignores it (``holds_adapter`` stays False)."""

    @abstractmethod
    def execute(
        self, receipt: WireReceipt, history: torch.Tensor, compute: ComputeSpec, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The span's outputs for the step's positions (the last ``tokens // B`` of ``history``): [B, T, H],
        computed in ``compute.dtype`` with ``compute.quantization`` (LookupError if it cannot). ``prompts``: deep
        prompts added at the first positions before each block, as the session's first step had them."""


class LocalVerifier(Verifier):
    """Loads the receipt's span locally (``nectar.models.load_span``) in the receipt's dtype and weight quantization
    and runs a full causal forward.

    :param models: model name as announced on the DHT -> built-in name or checkpoint folder
    :param load_span: the span loader (``nectar.models.load_span`` by default)
    :param adapters: LoRA adapter folders (PEFT's) it can recompute steps with, found by their digest
    """

    def __init__(
        self,
        models: Mapping[str, str | Path],
        *,
        name: str = "local",
        load_span: Callable | None = None,
        max_cached_spans: int = 8,
        adapters: Sequence[str | Path] = (),
    ):
        if load_span is None:
            from nectar.models import load_span
        self.name, self.load_span, self.max_cached = name, load_span, max_cached_spans
        self.paths = {model_id_hash(model_name): path for model_name, path in models.items()}
        self._spans: dict[tuple, tuple] = {}
        self.adapters: dict[bytes, Path] = {}
        if adapters:
            from nectar.models.adapters import adapter_digest

            for folder in adapters:
                try:
                    self.adapters[adapter_digest(folder)] = Path(folder)
                except OSError as e:  # not an adapter folder: its steps stay unaudited, the others are audited
                    logger.warning(f"Verifier {name} skips adapter folder {folder}: {e}")

    def hosts(self, model_id: bytes) -> bool | None:
        return bytes(model_id) in self.paths

    def holds_adapter(self, digest: bytes) -> bool:
        folder = self.adapters.get(bytes(digest))
        return folder is not None and folder.is_dir()  # a fetched one may have been evicted from the ledger's store

    def add_adapter(self, digest: bytes, folder: Path) -> None:
        self.adapters[bytes(digest)] = Path(folder)
        self._spans = {key: value for key, value in self._spans.items() if key[-1] != bytes(digest)}

    def _span(self, model_id: bytes, start: int, end: int, compute: ComputeSpec) -> tuple:
        """(the span, the adapters hooked on it or None)."""
        key = (model_id, start, end, compute.dtype, compute.quantization, compute.adapter)
        if key not in self._spans:
            if model_id not in self.paths:
                raise LookupError(f"verifier {self.name} does not host model 0x{model_id.hex()}")
            if compute.adapter and compute.adapter not in self.adapters:
                raise LookupError(f"verifier {self.name} holds no adapter 0x{compute.adapter.hex()}")
            if len(self._spans) >= self.max_cached:
                self._spans.pop(next(iter(self._spans)))
            # the same quantized weights as the node's: one recipe on every device (nectar.models.quant)
            extra = {} if compute.quantization == "none" else {"quantization": compute.quantization}
            span = self.load_span(self.paths[model_id], start, end, dtype=compute.torch_dtype, **extra)
            served = None
            if compute.adapter:
                from nectar.models.adapters import load_span_adapters

                served = load_span_adapters([span], [self.adapters[compute.adapter]])
            self._spans[key] = span, served
        return self._spans[key]

    def execute(
        self, receipt: WireReceipt, history: torch.Tensor, compute: ComputeSpec, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        span, served = self._span(receipt.model_id, receipt.block_start, receipt.block_end, compute)
        positions = step_positions(receipt, history)
        with torch.no_grad(), served.use(served.names[0]) if served else contextlib.nullcontext():
            return span(history.to(compute.torch_dtype), prompts=prompts)[:, -positions:]


def _malformed_adapter(error: Exception) -> bool:
    """Whether a verifier failed because the adapter itself is not a LoRA that fits the model."""
    from nectar.models.adapters import AdapterError

    return isinstance(error, AdapterError)


def _impossible_quantization(error: Exception) -> bool:
    """Whether a verifier failed because the receipt claims a quantization the model's stored weights do not have
    (a pre-quantized checkpoint: ``nectar.models.prequant``)."""
    from nectar.models.prequant import QuantizationMismatchError

    return isinstance(error, QuantizationMismatchError)


def step_positions(receipt: WireReceipt, history: torch.Tensor) -> int:
    batch = history.shape[0]
    if batch == 0 or receipt.tokens % batch or not 0 < receipt.tokens // batch <= history.shape[1]:
        raise ValueError(f"history {tuple(history.shape)} does not fit a step of {receipt.tokens} tokens")
    return receipt.tokens // batch


def is_picked(seed: bytes, leaf: bytes, fraction: float) -> bool:
    """Whether a receipt is checked: keccak(seed || leaf) below fraction * 2**256."""
    return int.from_bytes(keccak256(seed + leaf), "big") < int(fraction * (1 << 256))


def audit_rate(base: float, suspicion: float, gain: float, cap: float) -> float:
    """A node's audit rate: min(cap, base x (1 + gain x suspicion)), never below ``base``. ``suspicion`` is its pooled
    CUSUM over the threshold (S / H, 0 for an honest node almost always: docs/protocol.md, "The pooled test")."""
    return max(base, min(cap, base * (1 + gain * max(0.0, suspicion))))


def suspicion(session, node: str) -> float:
    """The node's pooled CUSUM over its threshold, the highest over the precisions it was scored in (0: none)."""
    worst = 0.0
    for descriptor, statistic in session.execute(
        select(PooledAudit.descriptor, PooledAudit.statistic).where(PooledAudit.node == node)
    ).all():
        try:
            threshold = POOLED_CUSUM[ComputeSpec.decode(bytes(descriptor)).dtype][1]
        except (KeyError, ValueError):
            continue
        worst = max(worst, statistic / threshold)
    return worst


def epoch_seed(root: bytes, secret: str) -> bytes:
    return keccak256(b"nectar-spot-check" + root + secret.encode())


@dataclass
class EpochCheckReport:
    epoch: int
    checked: int = 0
    passed: int = 0
    failed: int = 0
    inconclusive: int = 0
    failed_nodes: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    status: str  # passed / failed / inconclusive
    executions: int
    detail: str

    def __post_init__(self):  # a detail may quote the audited node's own error text: kept short in rows and logs
        self.detail = peer_text(self.detail, MAX_DETAIL)


class SpotChecker:
    """Picks and runs an epoch's spot checks; reports cheaters on chain.

    :param verifiers: at least two independent verifiers (the second is the tie-breaking third execution)
    :param audit: the source of step inputs
    :param chain: for ``attest_spot_check_failure`` (None: record only, for offline runs)
    """

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        verifiers: Sequence[Verifier],
        audit: AuditSource,
        chain=None,
        skip_clients: Sequence[str] = (),
    ):
        if len(verifiers) < 2:
            raise ValueError("spot checks need two verifiers: the second breaks ties on a disagreement")
        self.settings, self.engine, self.verifiers, self.audit, self.chain = settings, engine, verifiers, audit, chain
        self.skip_clients = {c.lower() for c in skip_clients}  # the verifiers' own re-executions are not audited

    def rate(self, session, node: str) -> float:
        """The node's audit rate now: the base rate q, raised by its pooled CUSUM (``audit_rate``)."""
        settings = self.settings
        return audit_rate(
            settings.spot_check_fraction,
            suspicion(session, node),
            settings.spot_check_gain,
            settings.spot_check_max_fraction,
        )

    def pick(self, number: int) -> int:
        """Fix this epoch's picks once (pending SpotCheck rows) at the base rate q, plus, for a node whose rate is
        raised now, its receipts up to its first pick at that rate (``_escalate``); returns how many."""
        q = self.settings.spot_check_fraction
        with session_scope(self.engine) as session:
            epoch = session.get(Epoch, number)
            if epoch is None or epoch.root is None:
                raise ValueError(f"epoch {number} is not closed yet; spot checks are picked after it closes")
            if epoch.spot_seed is not None:
                return 0
            seed = epoch_seed(epoch.root, self.settings.spot_check_secret)
            rows = session.execute(
                select(Receipt.id, Receipt.leaf, Receipt.node, Receipt.kind, Receipt.client).where(
                    Receipt.epoch_number == number
                )
            ).all()
            picked = 0
            for receipt_id, leaf, node, kind, client in rows:
                if client.lower() in self.skip_clients:
                    continue
                if kind in CHECKABLE_KINDS and is_picked(seed, leaf, q):
                    session.add(
                        SpotCheck(receipt_id=receipt_id, epoch_number=number, node=node, status="pending", executions=0)
                    )
                    picked += 1
            session.flush()
            for node in sorted({row.node for row in rows}):
                picked += self._escalate(session, number, seed, node, after=0)
            epoch.spot_seed = seed
        logger.info(f"Epoch {number}: {picked} of {len(rows)} receipts picked for spot checks")
        return picked

    def escalate(self, number: int, receipt_id: int) -> int:
        """After the audit of ``receipt_id``: picks the receipts of its node that follow it (``_escalate``)."""
        with session_scope(self.engine) as session:
            epoch, receipt = session.get(Epoch, number), session.get(Receipt, receipt_id)
            if epoch is None or epoch.spot_seed is None or receipt is None:
                return 0
            return self._escalate(session, number, bytes(epoch.spot_seed), receipt.node, after=receipt_id)

    def _escalate(self, session, number: int, seed: bytes, node: str, after: int) -> int:
        """The node's receipts of this epoch after receipt ``after``, up to its next pending pick, picked at its audit
        rate now: the same keyed hash below a higher bound, so a raised rate adds picks to the base ones and the node
        still cannot tell which. Checks run in receipt order, so a node's rate holds from one audit to its next, as if
        every step were picked when served, and never exceeds the cap (the bound on an epoch's checking work).
        Returns how many were added."""
        rate = self.rate(session, node)
        if rate <= self.settings.spot_check_fraction:
            return 0  # the base picks were made at this rate
        following = select(SpotCheck.receipt_id).where(
            SpotCheck.epoch_number == number, SpotCheck.node == node, SpotCheck.receipt_id > after
        )
        upto = session.scalar(following.where(SpotCheck.status == "pending").order_by(SpotCheck.receipt_id))
        query = select(Receipt.id, Receipt.leaf, Receipt.kind, Receipt.client).where(
            Receipt.epoch_number == number, Receipt.node == node, Receipt.id > after, Receipt.id.not_in(following)
        )
        if upto is not None:
            query = query.where(Receipt.id < upto)
        added = 0
        for row_id, leaf, kind, client in session.execute(query).all():
            if kind in CHECKABLE_KINDS and client.lower() not in self.skip_clients and is_picked(seed, leaf, rate):
                session.add(
                    SpotCheck(receipt_id=row_id, epoch_number=number, node=node, status="pending", executions=0)
                )
                added += 1
        if added:
            logger.info(f"Epoch {number}: node {node} is audited at rate {rate:.3g}: {added} more receipts picked")
        return added

    def check_epoch(self, number: int) -> EpochCheckReport:
        """Runs the epoch's pending checks in receipt order (the pooled test scores a node's steps in order), each
        followed by ``escalate``."""
        self.pick(number)
        report, receipt_id = EpochCheckReport(epoch=number), 0
        while True:
            with session_scope(self.engine) as session:
                receipt_id = session.scalar(
                    select(SpotCheck.receipt_id)
                    .where(
                        SpotCheck.epoch_number == number,
                        SpotCheck.status == "pending",
                        SpotCheck.receipt_id > receipt_id,  # escalation only adds picks after the one just checked
                    )
                    .order_by(SpotCheck.receipt_id)
                )
            if receipt_id is None:
                break
            verdict = self.check_receipt(receipt_id)
            self.escalate(number, receipt_id)
            report.checked += 1
            setattr(report, verdict.status, getattr(report, verdict.status) + 1)
            if report.checked % 20 == 0:
                logger.info(f"Epoch {number}: {report.checked} spot checks done")
        with session_scope(self.engine) as session:
            report.failed_nodes = sorted(
                {c.node for c in crud.spot_checks_of(session, epoch=number) if c.status == "failed"}
            )
        return report

    def check_receipt(self, receipt_id: int) -> Verdict:
        with session_scope(self.engine) as session:
            row = session.get(Receipt, receipt_id)
            signed, descriptor, leaf = crud.signed_receipt_of(row), row.fingerprint, bytes(row.leaf)
        verdict = self._judge(signed.receipt, descriptor, pooled=(receipt_id, leaf))
        with session_scope(self.engine) as session:
            check = crud.record_spot_check(
                session,
                receipt=session.get(Receipt, receipt_id),
                status=verdict.status,
                executions=verdict.executions,
                detail=verdict.detail,
            )
            check_id = check.id
            report = verdict.status == "failed" and self.chain is not None and check.slash_status is None
            if report:
                check.slash_status = self._case_status(session, check)
                report = check.slash_status == "unattested"
        if report:
            self._report_on_chain(check_id)
        log = logger.warning if verdict.status == "failed" else logger.debug
        log(f"Spot check of receipt {receipt_id} (node {signed.receipt.node}): {verdict.status}: {verdict.detail}")
        return verdict

    def _judge(
        self, receipt: WireReceipt, descriptor: bytes | None, pooled: tuple[int, bytes] | None = None
    ) -> Verdict:
        try:
            compute = ComputeSpec.decode(descriptor or b"")
        except ValueError as e:
            return Verdict("inconclusive", 0, f"the receipt's compute descriptor is unusable: {e}")
        if compute.adapter:
            missing = self._obtain_adapter(receipt, compute.adapter)
            if missing is not None:
                return missing
        step = self._audited_step(receipt)
        if isinstance(step, Verdict):
            return step
        history = step.history
        prompts = self._placed_prompts(receipt, history)
        if isinstance(prompts, Verdict):
            return prompts
        extra = {} if prompts is None else {"prompts": prompts}
        # the node signed a hash of its whole output: revealing anything else (or nothing) is its own failure
        if step.outputs is None:
            return Verdict("failed", 0, "the node revealed the step's inputs but not its output")
        if commit_tensor(step.outputs) != receipt.output_commitment:
            return Verdict("failed", 0, "the revealed output does not hash to the receipt's output commitment")
        claimed, blocks = step.outputs, receipt.block_end - receipt.block_start
        outputs = []
        for executions, verifier in enumerate(self.verifiers[:2], start=1):
            try:
                output = verifier.execute(receipt, history, compute, **extra)
            except Exception as e:
                if compute.adapter and _malformed_adapter(e):
                    # the files hash to the digest the node signed, and no honest node computes with such files
                    return Verdict("failed", executions, f"the node's adapter cannot be computed with: {e}")
                if _impossible_quantization(e):
                    # the model's weights are stored quantized in another mode: no honest node signs this descriptor
                    return Verdict("failed", executions, f"the receipt's quantization cannot be served: {e}")
                return Verdict("inconclusive", executions, f"verifier {verifier.name} failed: {type(e).__name__}: {e}")
            outputs.append(output)
            if outputs_match(claimed, output, compute, blocks):
                note = "" if executions == 1 else f"; verifier {self.verifiers[0].name} disagreed and was overruled"
                passed = Verdict("passed", executions + 1, f"recomputation in {compute.dtype} matches the output{note}")
                if executions == 1 and pooled is not None and compute.dtype in POOLED_DTYPES:
                    return self._pooled(receipt, descriptor, compute, claimed, output, history, extra, passed, *pooled)
                return passed
        deviations = ", ".join(f"{output_deviation(claimed, o):.3g}" for o in outputs)
        if outputs_match(outputs[0], outputs[1], compute, blocks):
            return Verdict(
                "failed",
                3,
                f"two independent recomputations in {compute.dtype} agree with each other and not with the node "
                f"(deviation {deviations}, tolerance {tolerance(compute, blocks):.3g} for {blocks} blocks)",
            )
        return Verdict("inconclusive", 3, f"all three executions disagree (deviation {deviations}); no one is accused")

    def _obtain_adapter(self, receipt: WireReceipt, digest: bytes) -> Verdict | None:
        """None once both verifiers hold the step's adapter: if they do not, it is fetched from the node that signed
        the receipt (``AuditSource.adapter``). The node's refusal, silence or other files fail the audit; only when
        the ledger cannot ask does the step stay unjudged (recomputing without the adapter would accuse an honest
        node)."""
        verifiers = self.verifiers[:2]
        if all(v.holds_adapter(digest) for v in verifiers):
            return None
        try:
            folder = self.audit.adapter(receipt, digest)
        except AuditFailed as e:
            return Verdict(
                "failed", 0, f"audit failed: the node did not hand over adapter 0x{digest.hex()[:16]}...: {e}"
            )
        except Exception as e:
            return Verdict(
                "inconclusive", 0, f"fetching adapter 0x{digest.hex()[:16]}... failed: {type(e).__name__}: {e}"
            )
        if folder is not None:
            for verifier in verifiers:
                if not verifier.holds_adapter(digest):
                    verifier.add_adapter(digest, folder)
        if all(v.holds_adapter(digest) for v in verifiers):
            return None
        return Verdict(
            "inconclusive",
            0,
            f"computed with LoRA adapter 0x{digest.hex()[:16]}..., which the verifiers do not hold "
            + (
                "and cannot take (use local verifiers for adapter steps)"
                if folder is not None
                else "and the audit source cannot fetch (audit over the swarm, or add it to --adapters-dir)"
            ),
        )

    def _pooled(
        self, receipt, descriptor, compute, claimed, recomputed, history, extra, passed: Verdict, row_id, leaf
    ) -> Verdict:
        """The pooled test (``nectar.wire.fingerprints.cusum_step``) for a step that passed on its own: scores it
        against a float32 recomputation, adds the score to the node's CUSUM for this descriptor, and turns the step
        into a failed check (the same case path as any failed audit) when the CUSUM reaches its threshold and the
        second verifier, recomputing the step independently, confirms the score."""
        # the same function in float32: with the step's adapter, if any (else both distances are the adapter's
        # effect and every score is about 1: noise would go unseen)
        reference = ComputeSpec("float32", compute.quantization, compute.device, compute.adapter)
        # keyed by precision, not device class: a node rotating its claimed device cannot split its evidence
        descriptor = ComputeSpec(compute.dtype, compute.quantization).encode()
        first, second = self.verifiers[:2]
        try:
            score = pooled_score(claimed, recomputed, first.execute(receipt, history, reference, **extra), compute)
        except Exception as e:
            why = f"{first.name} could not recompute in float32: {type(e).__name__}: {e}"
            return Verdict(passed.status, passed.executions, f"{passed.detail}; not scored for the pooled test ({why})")
        executions = passed.executions + 1
        with session_scope(self.engine) as session:
            state = self._pooled_state(session, receipt.node, descriptor)
            if row_id <= state.last_receipt_id:
                return Verdict("passed", executions, f"{passed.detail}; already scored for the pooled test")
            prior = state.statistic
        statistic, crossed = cusum_step(prior, score, compute)
        scores = [score]
        if crossed:  # the conviction must not rest on one verifier's word: the second recomputes the step too
            executions += 2
            try:
                again = second.execute(receipt, history, compute, **extra)
                agree = outputs_match(again, recomputed, compute, receipt.block_end - receipt.block_start)
                scores.append(
                    pooled_score(claimed, again, second.execute(receipt, history, reference, **extra), compute)
                )
            except Exception as e:
                agree, why = False, f"{type(e).__name__}: {e}"
            else:
                why = f"its recomputation in {compute.dtype} differs from {first.name}'s"
            if not agree:
                return Verdict(
                    "passed", executions, f"{passed.detail}; not scored for the pooled test ({second.name}: {why})"
                )
            score = min(scores)
            statistic, crossed = cusum_step(prior, score, compute)
        drift, threshold = POOLED_CUSUM[compute.dtype]
        with session_scope(self.engine) as session:
            state = self._pooled_state(session, receipt.node, descriptor)
            if row_id <= state.last_receipt_id:
                return Verdict("passed", executions, f"{passed.detail}; already scored for the pooled test")
            window = json.loads(state.window) if state.statistic > 0 else []
            window = (window + [["0x" + leaf.hex(), round(score, 4)]])[-POOLED_WINDOW:]
            state.steps, state.last_receipt_id = state.steps + 1, row_id
            if not crossed:
                state.statistic, state.window = statistic, json.dumps(window) if statistic > 0 else "[]"
                return Verdict(
                    "passed",
                    executions,
                    f"{passed.detail}; pooled score {score:.3g}, CUSUM {statistic:.3g}/{threshold}",
                )
            state.statistic, state.window, state.convictions = 0.0, "[]", state.convictions + 1
        cited = ", ".join(f"{leaf_hex} ({z:.3g})" for leaf_hex, z in window)
        return Verdict(
            "failed",
            executions,
            f"pooled test: the CUSUM of the node's audited {compute.dtype} steps reached {statistic:.3g} (threshold "
            f"{threshold}, drift {drift}; a step's score is its output's distance to a float32 recomputation over "
            f"the verifier's own {compute.dtype} recomputation's, about 1 for an honest node); this step's score "
            f"{', '.join(f'{z:.3g}' for z in scores)} by two verifiers that agree; the run's audited receipts "
            f"(leaf, score): {cited}",
        )

    @staticmethod
    def _pooled_state(session, node: str, descriptor: bytes) -> PooledAudit:
        state = session.scalar(
            select(PooledAudit).where(PooledAudit.node == node, PooledAudit.descriptor == bytes(descriptor))
        )
        if state is None:
            state = PooledAudit(
                node=node, descriptor=bytes(descriptor), statistic=0.0, steps=0, last_receipt_id=0, window="[]"
            )
            state.convictions = 0
            session.add(state)
            session.flush()
        return state

    def model_known(self, model_id: bytes) -> bool | None:
        """Whether the ledger knows the model a receipt names: a node announces it or a verifier hosts it. False only
        when some source can tell and none knows it; None when no source can tell."""
        answers = [self.audit.knows_model(model_id)] + [v.hosts(model_id) for v in self.verifiers[:2]]
        if any(a is True for a in answers):
            return True
        return False if any(a is False for a in answers) else None

    def _audited_step(self, receipt: WireReceipt) -> AuditedStep | Verdict:
        """The step's audited inputs and output, or the verdict when there is none. The node signed the receipt, so a
        model nobody knows, an unanswered or refused audit, and inputs its own receipts contradict are its failures;
        only the ledger's own problems (its view of the swarm, a verifier, its lateness) are inconclusive."""
        try:
            known = self.model_known(receipt.model_id)
        except Exception as e:
            return Verdict("inconclusive", 0, f"could not tell whether the model is known: {type(e).__name__}: {e}")
        if known is False:
            return Verdict(
                "failed",
                0,
                f"the receipt names model 0x{bytes(receipt.model_id).hex()}, which no node announces and no verifier "
                f"hosts: the node signed work nobody can check",
            )
        try:
            step = self.audit.audited_step(receipt)
        except AuditFailed as e:
            return Verdict("failed", 0, f"audit failed: {e}")
        except Exception as e:
            return Verdict("inconclusive", 0, f"audit source failed: {type(e).__name__}: {e}")
        if step is None:
            return Verdict("inconclusive", 0, "the step's inputs are no longer available")
        history = step.history
        try:
            positions = step_positions(receipt, history)
        except ValueError as e:
            return Verdict("failed", 0, f"the node answered the audit with inputs that do not fit its receipt: {e}")
        if commit_tensor(history[:, -positions:]) != receipt.input_commitment:
            return Verdict("failed", 0, "the node's audited inputs do not hash to its receipt's input commitment")
        if self._prefix_consistent(receipt, history) is False:
            logger.warning(f"Node {receipt.node} answered an audit with a history its own receipts contradict")
            return Verdict(
                "failed",
                0,
                "the audited history contradicts the node's earlier receipts of this session (a fabricated prefix)",
            )
        return step

    def _placed_prompts(self, receipt: WireReceipt, history: torch.Tensor) -> torch.Tensor | Verdict | None:
        """The deep prompts the node revealed, cut to the positions the session's first step covered: a node adds
        them with that step only, while a verifier's single forward over the history would add all of them. A
        node cannot dodge an audit by claiming prompts: its verifiers compute with the prompts it revealed."""
        prompts = self.audit.prompts(receipt)
        if prompts is None:
            return None
        if receipt.kind != ReceiptKind.INFERENCE:
            return prompts  # a forward is one step over its whole input
        first = next((r.tokens for r in self._session_rows(receipt) if r.step == 0), None)
        if first is None or first % history.shape[0]:
            return Verdict("inconclusive", 0, "deep prompts, but the session's first receipt is not on record")
        return prompts[:, :, : first // history.shape[0]]

    def _session_rows(self, receipt: WireReceipt) -> list:
        """The stored receipts of the receipt's session at its node, span and kind, in step order (detached)."""
        with session_scope(self.engine) as session:
            rows = crud.session_receipts(
                session,
                session_id=receipt.session_id,
                node=receipt.node,
                kind=receipt.kind,
                block_start=receipt.block_start,
                block_end=receipt.block_end,
            )
            session.expunge_all()
            return list(rows)

    def _prefix_consistent(self, receipt: WireReceipt, history: torch.Tensor) -> bool | None:
        """Whether each earlier step's slice of the audited history hashes to that step's signed input commitment,
        so a node cannot make up the context a step is judged in. None when it cannot tell (a rollback, a missing
        receipt, a single-shot forward)."""
        if receipt.kind != ReceiptKind.INFERENCE:
            return None
        segments = [
            (r.step, r.tokens, r.input_commitment) for r in self._session_rows(receipt) if r.step <= receipt.step
        ]
        batch = history.shape[0]
        if [step for step, _, _ in segments] != list(range(receipt.step + 1)) or any(t % batch for _, t, _ in segments):
            return None
        if sum(tokens // batch for _, tokens, _ in segments) != history.shape[1]:
            return None  # positions were rolled back (or the node kept more): the plain concatenation does not apply
        offset = 0
        for _, tokens, commitment in segments:
            length = tokens // batch
            if commit_tensor(history[:, offset : offset + length]) != commitment:
                return False
            offset += length
        return True

    @staticmethod
    def _case_status(session, check: SpotCheck) -> str:
        """``unattested`` for the node's first failure in this epoch (it becomes the node's one case), ``covered``
        for the others (kept on record, not attested)."""
        from nectar.ledger.slashing import CASE_HOLDING, COVERED, UNATTESTED

        holder = crud.node_epoch_case(
            session, node=check.node, epoch=check.epoch_number, statuses=CASE_HOLDING, exclude_id=check.id
        )
        return COVERED if holder is not None else UNATTESTED

    def _report_on_chain(self, check_id: int) -> None:
        """Attest the node's case now if the epoch's root is final; otherwise (or on a failure to send)
        ``slashing.finalize_spot_check_slashes`` retries it."""
        from nectar.ledger.slashing import attest, case_evidence

        with session_scope(self.engine) as session:
            evidence = case_evidence(session, session.get(SpotCheck, check_id))
        tx_hash, status = attest(self.chain, self.settings, evidence)
        with session_scope(self.engine) as session:
            check = session.get(SpotCheck, check_id)
            check.slash_status = status
            check.attest_tx_hash = tx_hash or check.attest_tx_hash


__all__ = [
    "AuditFailed",
    "AuditSource",
    "AuditedStep",
    "Verifier",
    "LocalVerifier",
    "SpotChecker",
    "EpochCheckReport",
    "Verdict",
    "is_picked",
    "audit_rate",
    "suspicion",
    "epoch_seed",
    "utcnow",
]
