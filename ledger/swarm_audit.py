"""Spot checks against the live swarm: a step's inputs come from the node that served it (its audit RPC), and the
step is re-run by OTHER nodes serving the same blocks (their forward RPC).

Select with ``NECTAR_LEDGER_AUDIT_SOURCE=swarm`` (``RpcAuditSource``) and ``NECTAR_LEDGER_SPOT_CHECK_VERIFIER=swarm``
(``SwarmVerifier``), plus ``NECTAR_LEDGER_SWARM_INITIAL_PEERS``. The verifiers' forward calls name the verifier
account as their client, and the spot checks skip receipts of that client (re-executions are not audited in turn).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch

from nectar.ledger.core.config import Settings
from nectar.ledger.spot_check import AuditedStep, AuditSource, Verifier, step_positions
from nectar.ledger.swarm import NodeEntry, SwarmView
from nectar.wire.eip712 import address_of, receipt_leaf
from nectar.wire.fingerprints import ComputeSpec
from nectar.wire.messages import AuditCall, AuditReply, ForwardCall, ForwardReply
from nectar.wire.peers import initial_peers
from nectar.wire.protocol import ErrorCode, NodeRPCError, module_uid
from nectar.wire.receipts import Receipt, keccak256

logger = logging.getLogger(__name__)


class RpcAuditSource(AuditSource):
    """Asks the node that signed a receipt for the step's input history and output over the audit RPC (``AuditCall``).

    :param swarm: the ledger's swarm view (finds the node's peer id from its announced Ethereum address)
    :param timeout: seconds per audit RPC
    """

    def __init__(self, swarm: SwarmView, *, timeout: float = 30.0):
        self.swarm, self.timeout = swarm, timeout

    def audited_step(self, receipt: Receipt) -> AuditedStep | None:
        model = self.swarm.model_name(receipt.model_id)
        if model is None:
            logger.info(f"No node announces model 0x{receipt.model_id.hex()}; cannot audit its receipts now")
            return None
        entry = self.swarm.peer_of(receipt.node, model)
        if entry is None:
            logger.info(f"Node {receipt.node} is not announced in the swarm now; its step cannot be audited")
            return None
        call = AuditCall(
            module_uid(model, receipt.block_start, receipt.block_end), bytes(receipt.session_id), int(receipt.step)
        )
        try:
            response = self.swarm.call(entry.peer_id, call.rpc, call.to_request(), timeout=self.timeout)
        except Exception as e:
            if NodeRPCError.code_of(e) == ErrorCode.UNKNOWN_SESSION:
                return None  # expired from the node's audit log, or never served there
            raise
        reply = AuditReply.decode(response)  # a ValueError if it carries no inputs
        if reply.prompts is not None or (reply.start, reply.end) != (receipt.block_start, receipt.block_end):
            raise ValueError(
                f"node {receipt.node} answered the audit with span {reply.start}:{reply.end}"
                f"{' and deep prompts' if reply.prompts is not None else ''}; the receipt is for "
                f"{receipt.block_start}:{receipt.block_end} without prompts"
            )
        return AuditedStep(reply.inputs, reply.outputs)


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
        self, swarm: SwarmView, *, rank: int, client: str, timeout: float = 30.0, fallback: Verifier | None = None
    ):
        self.swarm, self.rank, self.client, self.timeout, self.fallback = swarm, rank, client, timeout, fallback
        self.name = f"swarm-{rank}"
        self.executed_by: list[str] = []  # eth addresses (or the fallback's name) per execution, for reports

    def candidates(self, receipt: Receipt, model: str, compute: ComputeSpec | None = None) -> list[NodeEntry]:
        leaf = receipt_leaf(receipt)
        others = [
            e
            for e in self.swarm.serving(model, receipt.block_start, receipt.block_end)
            if e.info.eth_address.lower() != receipt.node.lower()
            and (compute is None or (compute.quantization == "none" and e.info.dtype == compute.dtype))
        ]
        return sorted(others, key=lambda e: keccak256(leaf + e.peer_id.to_bytes()))

    def execute(self, receipt: Receipt, history: torch.Tensor, compute: ComputeSpec) -> torch.Tensor:
        positions = step_positions(receipt, history)
        model = self.swarm.model_name(receipt.model_id)
        candidates = self.candidates(receipt, model, compute) if model else []
        if len(candidates) <= self.rank:
            if self.fallback is None:
                raise LookupError(
                    f"no {self.rank + 1} other node(s) serve blocks {receipt.block_start}:"
                    f"{receipt.block_end} of 0x{receipt.model_id.hex()[:16]} in {compute.dtype}; start another "
                    f"node with --dtype {compute.dtype} or configure a local verifier"
                )
            self.executed_by.append(self.fallback.name)
            return self.fallback.execute(receipt, history, compute)
        entry = candidates[self.rank]
        # a fresh session id per re-execution: the node signs a receipt for it, and two receipts for the same
        # (session, step) would read as a double-sign
        call = ForwardCall(
            module_uid(model, receipt.block_start, receipt.block_end),
            history,
            client=self.client,
            session_id=os.urandom(16),
            step=0,
        )
        response = self.swarm.call(entry.peer_id, call.rpc, call.to_request(), timeout=self.timeout)
        output = ForwardReply.decode(response).output  # a ValueError unless it carries one tensor
        if tuple(output.shape) != tuple(history.shape):
            raise ValueError(
                f"node {entry.info.eth_address} returned {tuple(output.shape)} for a forward of {tuple(history.shape)}"
            )
        self.executed_by.append(entry.info.eth_address)
        return output[:, -positions:]


def initial_peers_of(settings: Settings) -> list[str]:
    return initial_peers(settings.swarm_initial_peers, env=os.environ)


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
    return RpcAuditSource(swarm_view(settings), timeout=settings.spot_check_rpc_timeout)


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
