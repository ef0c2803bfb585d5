"""The node's RPC servicer: inference streams with a server-side KV cache, forward, backward, info, audit and push.

Every request is decoded and checked (``nectar.wire.messages``, ``nectar.node.steps``) before it reaches the compute
thread; a bad request ends only its own stream with an ``ErrorCode``-prefixed message, and the node keeps serving
everyone else. Each inference stream is an ``InferenceStream`` (``nectar.node.inference_stream``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from hivemind.p2p import P2P, P2PContext

from nectar.models.adapters import read_adapter_files
from nectar.node import trace
from nectar.node.audit_auth import AuditGate
from nectar.node.inference_stream import InferenceStream
from nectar.node.push import PushInbox
from nectar.node.steps import NodeSteps
from nectar.wire.messages import (
    AdapterCall,
    AdapterReply,
    AuditCall,
    AuditReply,
    BackwardCall,
    ForwardCall,
    InfoReply,
    Push,
    PushAck,
)
from nectar.wire.protocol import (
    RPC_ADAPTER,
    RPC_AUDIT,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    ErrorCode,
    NodeRPCError,
)
from nectar.wire.request_stream import RequestStream, RequestTimeout
from nectar.wire.transport import frame_limit, serve_stream

logger = logging.getLogger(__name__)


class NodeHandler:
    """Serves one ``SpanBackend`` over P2P. Created by ``nectar.node.server.Server``."""

    def __init__(
        self,
        steps: NodeSteps,
        *,
        info_provider: Callable[[], dict] = dict,
        push_allowed: Callable[[str, int], Awaitable[bool]] | None = None,
        audit_gate: AuditGate | None = None,
    ):
        """:param steps: the node's parts that work goes through (backend, compute, memory, signing, credit)
        :param info_provider: the info RPC's answer
        :param push_allowed: (address, block) -> whether a node serving ``block`` announces that direct lane
        :param audit_gate: who may audit (None: nobody; audit answers carry users' inputs)"""
        self.steps = steps
        self.config, self.model_id = steps.config, steps.model_id
        self.info_provider = info_provider
        self.active_sessions = 0
        self.inbox = PushInbox()  # sessions here that accept hidden states pushed by the previous hop
        self.pushes_sent = 0
        # (address, block) -> whether a node serving `block` announces that direct lane: a node pushes only to
        # announced lanes, so a client cannot point it at any host and port (None: no check, e.g. unit tests)
        self.push_allowed = push_allowed
        self.audit_gate = audit_gate

    # the server swaps these when the node moves to another span
    backend = property(lambda self: self.steps.backend, lambda self, value: setattr(self.steps, "backend", value))
    memory = property(lambda self: self.steps.memory, lambda self, value: setattr(self.steps, "memory", value))

    @property
    def step_seconds(self) -> float:
        """Event-loop time of inference steps outside compute (checks, receipts, packing)."""
        return self.steps.step_seconds

    @property
    def receipts_riding(self) -> int:
        """Receipts that went out in the next step's answer, not as messages of their own."""
        return self.steps.receipts_riding

    def handlers(self) -> dict:
        """RPC name -> stream handler: served over P2P and, where enabled, over the direct TCP lane."""
        return {
            RPC_INFO: self.rpc_info,
            RPC_INFERENCE: self.rpc_inference,
            RPC_FORWARD: self.rpc_forward,
            RPC_BACKWARD: self.rpc_backward,
            RPC_AUDIT: self.rpc_audit,
            RPC_ADAPTER: self.rpc_adapter,
            RPC_PUSH: self.rpc_push,
        }

    async def add_handlers(self, p2p: P2P) -> None:
        for name, handler in self.handlers().items():
            await serve_stream(p2p, name, handler, max_frame_bytes=self.max_frame_bytes)

    @property
    def max_frame_bytes(self) -> int:
        """The largest request frame either lane reads (the setting, else what the model's hidden size needs)."""
        return self.config.max_frame_bytes or frame_limit(self.backend.hidden_size)

    # ---- RPCs -------------------------------------------------------------------------------------------------

    async def rpc_info(self, requests: RequestStream, context: P2PContext):
        async for _ in requests:
            yield InfoReply(self.info_provider()).to_response()
            return

    def rpc_inference(self, requests: RequestStream, context: P2PContext):
        return InferenceStream(self, requests, peer_id=_local_id(context)).run()

    async def _single_request(self, requests: RequestStream):
        try:
            request = await requests.next(self.config.step_timeout if self.config.step_timeout > 0 else None)
        except RequestTimeout:
            raise NodeRPCError(
                ErrorCode.SESSION_EXPIRED,
                f"no request for {self.config.step_timeout:.0f}s; send the request as the stream opens",
            )
        if request is None:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "empty request stream")
        return request

    async def rpc_forward(self, requests: RequestStream, context: P2PContext):
        call = ForwardCall.decode(await self._single_request(requests))
        client = self.steps.authenticate(call, _local_id(context))  # billed as its signer, never as it says
        # a registered verifier re-executing a step for an audit is served without credit
        free = self.audit_gate is not None and client.lower() in await self.audit_gate.verifiers()
        yield (await self.steps.forward(call, client, free=free)).to_response()

    async def rpc_backward(self, requests: RequestStream, context: P2PContext):
        call = BackwardCall.decode(await self._single_request(requests))
        yield (await self.steps.backward(call, self.steps.authenticate(call, _local_id(context)))).to_response()

    async def rpc_audit(self, requests: RequestStream, context: P2PContext):
        """Returns a session's inputs up to a step and that step's output, for spot checks by registered verifiers
        only."""
        call = AuditCall.decode(await self._single_request(requests))
        if self.audit_gate is None:
            raise NodeRPCError(ErrorCode.FORBIDDEN, "this node answers no audits (it has no verifier set)")
        await self.audit_gate.check(call, _local_id(context))
        found = self.steps.audit.history(call.session_id, call.step)
        if found is None or (call.session_id, call.step) in self.steps.evaded:
            raise NodeRPCError(
                ErrorCode.UNKNOWN_SESSION,
                f"no audit record for this session at step {call.step} (expired or never served here)",
            )
        inputs, (start, end), prompts, outputs = found
        # deep prompts of the first step are part of the computation: a verifier must add them too; the step's
        # output is revealed whole against the receipt's output commitment
        yield AuditReply(inputs, start, end, prompts, outputs).to_response()

    async def rpc_adapter(self, requests: RequestStream, context: P2PContext):
        """The files of a LoRA adapter this node serves, by digest, for registered verifiers only: a step computed
        with it is audited by recomputing with the very files its receipt's digest binds (issue 21: no free
        evasion through an adapter the ledger does not hold)."""
        call = AdapterCall.decode(await self._single_request(requests))
        if self.audit_gate is None:
            raise NodeRPCError(ErrorCode.FORBIDDEN, "this node answers no audits (it has no verifier set)")
        await self.audit_gate.check(call, _local_id(context))
        served = getattr(self.backend, "adapters", None)
        found = next((a for a in served.adapters.values() if a.digest == call.digest), None) if served else None
        if found is None:
            raise NodeRPCError(
                ErrorCode.UNKNOWN_ADAPTER, f"this node serves no adapter of digest 0x{call.digest.hex()[:16]}..."
            )
        config, weights = await asyncio.to_thread(read_adapter_files, found.path)  # up to a GiB: off the loop
        yield AdapterReply(config, weights).to_response()

    async def rpc_push(self, requests: RequestStream, context: P2PContext):
        """Hidden states the previous hop of a session pushes here (see ``nectar.node.push``); one ack each."""
        async for request in requests:
            push = Push.decode(request)
            slot = self.inbox.find(push.session_id, push.token)
            self.steps.check_hidden(push.hidden, batch_size=slot.batch_size)
            self.inbox.deliver(slot, push.step, push.hidden)
            trace.event("push_in", push.step)
            yield PushAck().to_response()


def _local_id(context: P2PContext | None) -> str:
    """This node's peer id as the caller dialled it (signed calls name it: no replay at another node); "" in
    process."""
    local_id = getattr(context, "local_id", None) if context is not None else None
    return str(local_id) if local_id is not None else ""
