"""Spot checks against the live swarm: a step's inputs come from the node that served it (its audit RPC), and the
step is re-run by OTHER nodes serving the same blocks (their forward RPC).

Select with ``NECTAR_LEDGER_AUDIT_SOURCE=swarm`` (``RpcAuditSource``) and ``NECTAR_LEDGER_SPOT_CHECK_VERIFIER=swarm``
(``SwarmVerifier``), plus ``NECTAR_LEDGER_SWARM_INITIAL_PEERS``. The verifiers' forward calls name the verifier
account as their client, and the spot checks skip receipts of that client (re-executions are not audited in turn).
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from pathlib import Path

import torch

from nectar.cli_kit import swarm_file
from nectar.ledger.adapter_store import AdapterRejected, AdapterStore
from nectar.ledger.core.config import Settings
from nectar.ledger.spot_check import AuditedStep, AuditFailed, AuditSource, Verifier, step_positions
from nectar.ledger.swarm import NodeEntry, SwarmView
from nectar.wire.eip712 import address_of, receipt_leaf
from nectar.wire.fingerprints import ComputeSpec
from nectar.wire.messages import AdapterCall, AdapterReply, AuditCall, AuditReply, ForwardCall, ForwardReply
from nectar.wire.peers import initial_peers
from nectar.wire.protocol import ErrorCode, NodeRPCError, module_uid
from nectar.wire.receipts import Receipt, keccak256
from nectar.wire.transport import AnswerTooLarge

logger = logging.getLogger(__name__)


CLOCK_ALLOWANCE_S = 120.0  # how far a receipt's timestamp may be behind its signing (clients refuse older ones)
ADAPTER_REPLY_OVERHEAD = 64 * 1024  # an adapter answer's framing and metadata besides its files
RETRYABLE = (None, ErrorCode.INTERNAL, ErrorCode.FORBIDDEN)  # no answer, an overload, an outdated verifier set


class RpcAuditSource(AuditSource):
    """Asks the node that signed a receipt for the step's input history and output over the audit RPC
    (``AuditCall``), signed with the verifier key (nodes answer only registered verifiers).

    No free evasion: a node must answer within the audit window. A call that gets no answer at all (the node is not
    announced, unreachable, times out, is overloaded or does not take the signature yet) is retried with backoff
    (1, 2, 4 ... s, at most 15 s apart) until ``window_s`` after the node's first unanswered call of this run; then
    the audit fails (``AuditFailed``). The window is per node: once spent, later calls to the node are tried once, so
    an absent node stalls a checking run at most ``window_s``. Any other answer without the inputs (no record of the
    step, a malformed reply) fails at once. Only when the ledger itself came late (the first call more than
    ``retention_s - window_s - CLOCK_ALLOWANCE_S`` after the receipt's timestamp: the node may have dropped the record
    by the rules) is a missing answer inconclusive.

    A step computed with a LoRA adapter the ledger does not hold is recomputed with the adapter's files, fetched from
    the node by digest (``adapter``) under the same rules; files of another digest or over the ledger's cap fail the
    audit at once.

    :param swarm: the ledger's swarm view (finds the node's peer id from its announced Ethereum address)
    :param key: the verifier private key that signs the audit calls
    :param timeout: seconds per audit RPC
    :param adapters: where adapters fetched from nodes are kept (``adapter``); a fresh temporary folder by default
    """

    def __init__(
        self,
        swarm: SwarmView,
        *,
        key: str,
        timeout: float = 30.0,
        window_s: float = 120.0,
        retention_s: float = 900.0,
        sleep=time.sleep,
        clock=time.time,
        adapters: AdapterStore | None = None,
    ):
        self.swarm, self.key, self.timeout, self.sleep, self.clock = swarm, key, timeout, sleep, clock
        self.adapters = adapters if adapters is not None else AdapterStore()  # fetched adapters (issue 21)
        self.window_s, self.retention_s = window_s, retention_s
        self._windows: dict[str, float] = {}  # node -> when its audit window (opened by an unanswered call) ends
        self._prompts: dict[bytes, torch.Tensor] = {}  # receipt leaf -> deep prompts its audit revealed

    def prompts(self, receipt: Receipt) -> torch.Tensor | None:
        return self._prompts.get(receipt_leaf(receipt))

    def knows_model(self, model_id: bytes) -> bool | None:
        return self.swarm.knows_model(model_id)

    def audited_step(self, receipt: Receipt) -> AuditedStep | None:
        return self._within_window(receipt, lambda: self._ask(receipt), "the audit")

    def adapter(self, receipt: Receipt, digest: bytes) -> Path | None:
        """The adapter's files from the node that signed the receipt (``AdapterCall``), within the same audit window
        as an audit call, checked against ``digest`` and kept in ``adapters`` (bounded in bytes and count)."""
        held = self.adapters.get(digest)
        if held is not None:
            return held
        config, weights = self._within_window(receipt, lambda: self._ask_adapter(receipt, digest), "the adapter call")
        try:
            return self.adapters.admit(digest, config, weights)
        except AdapterRejected as e:
            raise AuditFailed(f"node {receipt.node} answered the adapter call with {e}") from e

    def _ask_adapter(self, receipt: Receipt, digest: bytes) -> tuple[bytes, bytes]:
        entry = self._entry(receipt)
        call = AdapterCall(bytes(digest)).signed(self.key, node=receipt.node, peer_id=str(entry.peer_id))
        limit = self.adapters.max_bytes + ADAPTER_REPLY_OVERHEAD
        try:
            # an answer declaring more than the cap is refused from its frame header, before its body is read
            response = self.swarm.call(
                entry.peer_id, call.rpc, call.to_request(), timeout=self.timeout, max_frame_bytes=limit
            )
            reply = AdapterReply.decode(response)
        except AnswerTooLarge as e:
            raise AuditFailed(
                f"node {receipt.node} answered the adapter call with more than the ledger's {limit} bytes: {e}"
            ) from e
        except Exception as e:
            raise _Unanswered(e) from e
        return reply.config, reply.weights

    def _entry(self, receipt: Receipt) -> NodeEntry:
        model = self.swarm.model_name(receipt.model_id)
        entry = self.swarm.peer_of(receipt.node, model) if model is not None else None
        if entry is None:
            raise _Unanswered(
                LookupError(f"node {receipt.node} does not announce model 0x{receipt.model_id.hex()[:16]}... now")
            )
        return entry

    def _within_window(self, receipt: Receipt, ask, what: str):
        """``ask()`` until it answers, retried within the node's audit window (see the class)."""
        now = self.clock()
        late = now > receipt.timestamp + self.retention_s - self.window_s - CLOCK_ALLOWANCE_S
        node = receipt.node.lower()
        window_end = self._windows.get(node)
        if window_end is None or now > window_end + self.window_s:  # none yet, or a past run's: open a new one
            window_end = now + self.window_s
        backoff, attempts, last = 1.0, 0, None
        while True:
            attempts += 1
            try:
                answer = ask()
                self._windows.pop(node, None)
                return answer
            except _Unanswered as e:
                last = e
                if NodeRPCError.code_of(e.cause) not in RETRYABLE:
                    break  # the node answered, without the inputs: no retry makes it honest
            self._windows[node] = window_end
            remaining = window_end - self.clock()
            if remaining <= 0:
                break
            self.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 15.0)
        if late:
            raise LookupError(
                f"the ledger audited {receipt.node}'s step too late ({now - receipt.timestamp:.0f}s after it was "
                f"signed; nodes keep audit records {self.retention_s:.0f}s): not the node's fault ({last})"
            )
        raise AuditFailed(
            f"node {receipt.node} did not answer {what} of session 0x{bytes(receipt.session_id).hex()[:16]}... "
            f"step {receipt.step} ({attempts} attempt(s) over a {self.window_s:.0f}s audit window): {last}"
        ) from last.cause

    def _ask(self, receipt: Receipt) -> AuditedStep:
        """One audit call; raises ``_Unanswered`` for anything but the inputs."""
        entry = self._entry(receipt)
        model = self.swarm.model_name(receipt.model_id)
        call = AuditCall(
            module_uid(model, receipt.block_start, receipt.block_end), bytes(receipt.session_id), int(receipt.step)
        ).signed(self.key, node=receipt.node, peer_id=str(entry.peer_id))
        try:
            response = self.swarm.call(entry.peer_id, call.rpc, call.to_request(), timeout=self.timeout)
            reply = AuditReply.decode(response)  # a ValueError if it carries no inputs
        except Exception as e:
            raise _Unanswered(e) from e
        if (reply.start, reply.end) != (receipt.block_start, receipt.block_end):
            raise _Unanswered(
                ValueError(
                    f"node {receipt.node} answered the audit with span {reply.start}:{reply.end}; the receipt is for "
                    f"{receipt.block_start}:{receipt.block_end}"
                )
            )
        inputs, prompts = reply.inputs, reply.prompts
        if prompts is not None:
            span = receipt.block_end - receipt.block_start
            if (
                inputs.ndim != 3
                or prompts.ndim != 4
                or prompts.shape[0] != span
                or prompts.shape[1] != inputs.shape[0]  # what nodes accept with a step (and re-run in a forward)
                or prompts.shape[2] < 1
                or prompts.shape[3] != inputs.shape[2]
                or not torch.isfinite(prompts).all()
            ):
                raise _Unanswered(
                    ValueError(f"node {receipt.node} answered the audit with malformed prompts {tuple(prompts.shape)}")
                )
            if len(self._prompts) > 1024:
                self._prompts.clear()
            self._prompts[receipt_leaf(receipt)] = prompts
        return AuditedStep(inputs, reply.outputs)


class _Unanswered(Exception):
    """An audit call that did not bring the inputs back (``cause``: why)."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class SwarmVerifier(Verifier):
    """Re-runs a step on another node serving the same blocks in the same dtype (forward RPC over the whole input
    history): like is compared with like, with that precision's tolerance.

    Candidates are ordered per receipt by keccak(leaf || peer id), so checks spread over the swarm and verifiers of
    different ``rank`` pick different nodes for the same receipt; the receipt's own node is never a candidate.

    :param swarm: the ledger's swarm view
    :param rank: 0 for the first execution, 1 for the tie-break (a different node than rank 0)
    :param client: address named as the client of the re-executions (the verifier account)
    :param fallback: used when fewer than ``rank + 1`` other nodes serve the span (e.g. a ``LocalVerifier``)
    """

    def __init__(
        self,
        swarm: SwarmView,
        *,
        rank: int,
        client: str,
        timeout: float = 30.0,
        fallback: Verifier | None = None,
        key: str | None = None,
    ):
        self.swarm, self.rank, self.client, self.timeout, self.fallback = swarm, rank, client, timeout, fallback
        # re-executions are signed (nodes bill only a call's signer, issue 22); a registered verifier's are free
        self.key = key or ("0x" + os.urandom(32).hex())
        self.name = f"swarm-{rank}"
        self.executed_by: list[str] = []  # eth addresses (or the fallback's name) per execution, for reports

    def hosts(self, model_id: bytes) -> bool | None:
        known = self.swarm.knows_model(model_id)
        if known is None:
            return None  # the ledger cannot see the swarm: it cannot tell
        return True if known else (self.fallback.hosts(model_id) if self.fallback is not None else False)

    def holds_adapter(self, digest: bytes) -> bool:
        # forward calls name no adapter: steps made with one are recomputed by the fallback (a local verifier)
        return self.fallback is not None and self.fallback.holds_adapter(digest)

    def add_adapter(self, digest: bytes, folder: Path) -> None:
        if self.fallback is not None:
            self.fallback.add_adapter(digest, folder)

    def candidates(self, receipt: Receipt, model: str, compute: ComputeSpec | None = None) -> list[NodeEntry]:
        leaf = receipt_leaf(receipt)
        others = [
            e
            for e in self.swarm.serving(model, receipt.block_start, receipt.block_end)
            if e.info.eth_address.lower() != receipt.node.lower()
            and (compute is None or (e.info.quant == compute.quantization and e.info.dtype == compute.dtype))
        ]
        return sorted(others, key=lambda e: keccak256(leaf + e.peer_id.to_bytes()))

    def execute(
        self, receipt: Receipt, history: torch.Tensor, compute: ComputeSpec, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        positions = step_positions(receipt, history)
        model = self.swarm.model_name(receipt.model_id)
        candidates = self.candidates(receipt, model, compute) if model and not compute.adapter else []
        if len(candidates) <= self.rank:
            if self.fallback is None:
                raise LookupError(
                    f"no {self.rank + 1} other node(s) serve blocks {receipt.block_start}:"
                    f"{receipt.block_end} of 0x{receipt.model_id.hex()[:16]} in {compute.dtype} with "
                    f"{compute.quantization} weights; start another node with --dtype {compute.dtype} --quant "
                    f"{compute.quantization} or configure a local verifier"
                )
            self.executed_by.append(self.fallback.name)
            return self.fallback.execute(receipt, history, compute, prompts=prompts)
        entry = candidates[self.rank]
        # a fresh session id per re-execution: the node signs a receipt for it, and two receipts for the same
        # (session, step) would read as a double-sign
        call = ForwardCall(
            module_uid(model, receipt.block_start, receipt.block_end),
            history,
            prompts,
            client=self.client,
            session_id=os.urandom(16),
            step=0,
        ).signed(self.key, node=entry.info.eth_address, peer_id=str(entry.peer_id))  # nodes serve verifiers free
        response = self.swarm.call(entry.peer_id, call.rpc, call.to_request(), timeout=self.timeout)
        output = ForwardReply.decode(response).output  # a ValueError unless it carries one tensor
        if tuple(output.shape) != tuple(history.shape):
            raise ValueError(
                f"node {entry.info.eth_address} returned {tuple(output.shape)} for a forward of {tuple(history.shape)}"
            )
        self.executed_by.append(entry.info.eth_address)
        return output[:, -positions:]


def initial_peers_of(settings: Settings) -> list[str]:
    return initial_peers(settings.swarm_initial_peers, env=os.environ, swarm=swarm_file(env=os.environ))


_VIEWS: list[SwarmView] = []


@lru_cache(maxsize=4)
def _shared_view(initial_peers: tuple[str, ...]) -> SwarmView:
    view = SwarmView(initial_peers)  # one DHT peer per process, reused by every spot-check task
    _VIEWS.append(view)
    return view


def close_views() -> None:
    """Leave the swarm (called when a worker process shuts down: a live DHT peer would hold its exit up)."""
    if _shared_view.cache_info().currsize:
        for view in list(_VIEWS):
            view.shutdown()
        _VIEWS.clear()
        _shared_view.cache_clear()


def swarm_view(settings: Settings) -> SwarmView:
    return _shared_view(tuple(initial_peers_of(settings)))


def audit_from_settings(settings: Settings) -> RpcAuditSource:
    """Factory for ``NECTAR_LEDGER_AUDIT_SOURCE`` (``swarm`` is short for this)."""
    return RpcAuditSource(
        swarm_view(settings),
        key=settings.key_for("verifier"),
        timeout=settings.spot_check_rpc_timeout,
        window_s=settings.spot_check_audit_window_s,
        retention_s=settings.audit_retention_s,
    )


def verifier_client(settings: Settings) -> str:
    """The address re-executions are billed to (the verifier account); their receipts are not spot-checked."""
    return address_of(settings.key_for("verifier"))


def swarm_verifiers(settings: Settings, fallback: list[Verifier] | None = None) -> list[Verifier]:
    """Two swarm verifiers (first execution and tie-break on different nodes), each with a local fallback."""
    fallback = fallback or [None, None]
    client = verifier_client(settings)
    return [
        SwarmVerifier(
            swarm_view(settings),
            rank=rank,
            client=client,
            timeout=settings.spot_check_rpc_timeout,
            fallback=fallback[rank],
            key=settings.key_for("verifier"),
        )
        for rank in (0, 1)
    ]


__all__ = [
    "RpcAuditSource",
    "SwarmVerifier",
    "audit_from_settings",
    "swarm_verifiers",
    "swarm_view",
    "close_views",
    "verifier_client",
    "initial_peers_of",
]
