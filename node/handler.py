"""The node's RPC servicer: inference streams with a server-side KV cache, forward, backward, info and audit.

Every request is validated before it reaches the compute thread; a bad request ends only its own stream with an
``ErrorCode``-prefixed message, and the node keeps serving everyone else.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import numpy as np
import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from nectar.node import trace
from nectar.node.audit import AuditLog
from nectar.node.backend import SpanBackend
from nectar.node.config import NodeConfig
from nectar.node.memory_cache import MemoryCache
from nectar.node.payments import NoPaymentPolicy, PaymentPolicy
from nectar.node.push import PushInbox, PushLink
from nectar.node.receipts import CreditLedger, ReceiptSigner
from nectar.node.signing import InlineSigning, PendingReceipt, SigningWorker
from nectar.node.task_pool import ComputeThread, Priority
from nectar.wire import receipts as schema
from nectar.wire.protocol import (
    MAX_BATCH_SIZE, MAX_TOKENS_PER_REQUEST, RPC_AUDIT, RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE, RPC_INFO, RPC_PUSH,
    ErrorCode, NodeRPCError, make_response, pack_metadata, pack_tensors, parse_module_uid, unpack_metadata,
    unpack_tensors,
)
from nectar.wire.direct import parse_address
from nectar.wire.request_stream import RequestStream, RequestTimeout
from nectar.wire.transport import serve_stream

logger = logging.getLogger(__name__)


class NodeHandler:
    """Serves one ``SpanBackend`` over P2P. Created by ``nectar.node.server.Server``."""

    def __init__(
        self,
        backend: SpanBackend,
        *,
        config: NodeConfig,
        model_id: str,
        compute: ComputeThread,
        memory: MemoryCache,
        signer: ReceiptSigner,
        credit: CreditLedger,
        audit: AuditLog,
        payments: PaymentPolicy | None = None,
        info_provider: Callable[[], dict] = dict,
        push_allowed: Optional[Callable[[str, int], Awaitable[bool]]] = None,
        signing: InlineSigning | SigningWorker | None = None,
    ):
        self.backend, self.config, self.model_id = backend, config, model_id
        self.compute, self.memory, self.signer, self.credit, self.audit = compute, memory, signer, credit, audit
        self.payments = payments or NoPaymentPolicy()
        self.signing = signing or InlineSigning(signer)
        self.info_provider = info_provider
        self.active_sessions = 0
        self.step_seconds = 0.0  # event-loop time of inference steps outside compute (checks, receipts, packing)
        self.inbox = PushInbox()  # sessions here that accept hidden states pushed by the previous hop
        self.pushes_sent = 0
        # (address, block) -> whether a node serving `block` announces that direct lane: a node pushes only to
        # announced lanes, so a client cannot point it at any host and port (None: no check, e.g. unit tests)
        self.push_allowed = push_allowed

    def handlers(self) -> dict:
        """RPC name -> stream handler: served over P2P and, where enabled, over the direct TCP lane."""
        return {RPC_INFO: self.rpc_info, RPC_INFERENCE: self.rpc_inference, RPC_FORWARD: self.rpc_forward,
                RPC_BACKWARD: self.rpc_backward, RPC_AUDIT: self.rpc_audit, RPC_PUSH: self.rpc_push}

    async def add_handlers(self, p2p: P2P) -> None:
        for name, handler in self.handlers().items():
            await serve_stream(p2p, name, handler)

    # ---- validation -------------------------------------------------------------------------------------------

    def _check_span(self, uid: str) -> tuple[int, int]:
        model_id, start, end = parse_module_uid(uid)
        if model_id != self.model_id:
            raise NodeRPCError(ErrorCode.WRONG_SPAN, f"this node serves model {self.model_id!r}, not {model_id!r}")
        if not (self.backend.start <= start < end <= self.backend.end):
            raise NodeRPCError(
                ErrorCode.WRONG_SPAN,
                f"blocks {start}:{end} requested, this node hosts {self.backend.start}:{self.backend.end}",
            )
        return start, end

    def _check_hidden(self, tensor: torch.Tensor, *, batch_size: Optional[int] = None, what="hidden_states"):
        if tensor.ndim != 3 or tensor.shape[-1] != self.backend.hidden_size:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"{what} must have shape [batch, tokens, {self.backend.hidden_size}], got {list(tensor.shape)}",
            )
        if not tensor.is_floating_point():
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"{what} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.shape[0] < 1 or tensor.shape[1] < 1:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"{what} is empty: shape {list(tensor.shape)}")
        if tensor.shape[0] > MAX_BATCH_SIZE or tensor.shape[0] * tensor.shape[1] > MAX_TOKENS_PER_REQUEST:
            raise NodeRPCError(
                ErrorCode.TOO_LARGE,
                f"{what} has {tensor.shape[0]}x{tensor.shape[1]} tokens; limits are batch {MAX_BATCH_SIZE} and "
                f"{MAX_TOKENS_PER_REQUEST} tokens per request: split it into smaller requests",
            )
        if batch_size is not None and tensor.shape[0] != batch_size:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST, f"{what} batch is {tensor.shape[0]}, the session was opened for {batch_size}"
            )
        if not _all_finite(tensor):
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"{what} contains NaN or infinity")

    def _check_prompts(self, prompts: Optional[torch.Tensor], hidden: torch.Tensor, start: int, end: int):
        if prompts is None:
            return
        expected = (end - start, hidden.shape[0])
        if prompts.ndim != 4 or tuple(prompts.shape[:2]) != expected or prompts.shape[-1] != hidden.shape[-1]:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"prompts must have shape [{end - start}, {hidden.shape[0]}, prefix, {hidden.shape[-1]}], "
                f"got {list(prompts.shape)}",
            )

    @staticmethod
    def _session_id(metadata: dict) -> bytes:
        session_id = metadata.get("session_id")
        if not isinstance(session_id, bytes) or not (1 <= len(session_id) <= 32):
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "session_id must be 1 to 32 bytes")
        return session_id.rjust(32, b"\0")

    def _call_session_id(self, metadata: dict) -> bytes:
        # A forward/backward call without a session gets a fresh id: two such receipts must never share
        # (session, step), or they would look like a double-sign and an honest node could be slashed.
        return self._session_id(metadata) if "session_id" in metadata else os.urandom(32)

    @staticmethod
    def _int(metadata: dict, name: str, low: int, high: int, default=None) -> int:
        value = metadata.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= high):
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"{name} must be an integer in [{low}, {high}], got {value!r}")
        return value

    def _client(self, metadata: dict) -> str:
        client = metadata.get("client", "0x" + "00" * 20)
        try:
            return schema.checksum_address(client, "client")
        except ValueError:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"client must be an Ethereum address, got {client!r}")

    def _maybe_corrupt(self, outputs: torch.Tensor) -> torch.Tensor:
        # Testing aid: a dishonest node, so spot checks can be shown to catch one.
        if self.config.corrupt_rate > 0 and random.random() < self.config.corrupt_rate:
            return outputs + torch.randn_like(outputs) * outputs.abs().mean().clamp_min(1e-3)
        return outputs

    def _settle_voucher(self, metadata: dict, client: str) -> None:
        if "voucher" in metadata:
            signed = self.credit.accept_voucher(metadata["voucher"], client)
            if signed is not None:
                self.payments.on_voucher(signed)

    async def _sign(self, **fields) -> dict:
        return await self._receipt_reply(self.signing.prepare(**fields), fields["client"])

    async def _receipt_reply(self, pending: PendingReceipt, client: str) -> dict:
        signed, fingerprint, receipt_json = await pending.result()
        self.credit.charge(client, signed.receipt.amount)
        self.payments.on_receipt(signed, fingerprint)
        return {"receipt": receipt_json, "fingerprint": fingerprint}

    # ---- RPCs -------------------------------------------------------------------------------------------------

    async def rpc_info(self, requests: RequestStream, context: P2PContext):
        async for _ in requests:
            yield make_response([], self.info_provider())
            return

    async def rpc_inference(self, requests: RequestStream, context: P2PContext):
        reader = _Requests(requests)
        request = await reader.next(self.config.session_timeout)
        if request is None:
            return
        metadata = unpack_metadata(request.metadata)
        if metadata.get("type") != "open":
            raise NodeRPCError(
                ErrorCode.UNKNOWN_SESSION,
                "this stream has no open session; send {'type': 'open', ...} first (sessions live in one stream)",
            )
        start, end = self._check_span(request.uid)
        session_id = self._session_id(metadata)
        batch_size = self._int(metadata, "batch_size", 1, MAX_BATCH_SIZE, default=1)
        max_length = self._int(metadata, "max_length", 1, MAX_TOKENS_PER_REQUEST)
        client = self._client(metadata)
        token = self._push_token(metadata)
        # "separate": each step's receipt is a message of its own, signed while the session's next step computes
        # (or once the stream goes quiet): signing is most of a step's event-loop time, and a node serving many
        # sessions would otherwise sign between a round's outputs and its sessions' next requests
        separate_receipts = metadata.get("receipts") == "separate"
        nbytes = self.backend.cache_bytes_per_token(start, end, batch_size) * max_length

        with self.memory.reserve(nbytes):
            caches = await self.compute.submit(
                lambda: self.backend.new_caches(start, end, batch_size, max_length), Priority.INFERENCE
            )
            self.active_sessions += 1
            slot = self.inbox.open(session_id, token, batch_size) if token is not None else None
            link: Optional[PushLink] = None  # this session's stream to the next hop (one at a time)
            receipt: Optional[Callable[[], Awaitable[runtime_pb2.ExpertResponse]]] = None  # the last step's, unsent
            try:
                length = 0
                while True:
                    try:
                        tensors = unpack_tensors(request.tensors) if request.tensors else None
                        if metadata.get("pushed") is True and tensors is None:
                            if receipt is not None:  # the push may take a while: this receipt need not
                                yield await receipt()
                                receipt = None
                            tensors = await self._await_push(slot, metadata, reader)
                            if tensors is None:  # the client gave up on this push: it relays the step instead
                                yield make_response([], {"push_missing": True})
                        if tensors is not None:
                            target, push = self._push_target(metadata), None
                            if target is not None and (link is None or link.address != target[0]):
                                if self.push_allowed is not None and not await self.push_allowed(target[0], end):
                                    logger.warning(f"Not pushing to {target[0]}: no node serving block {end} "
                                                   "announces that direct lane (the client relays the step)")
                                    target = None
                            if target is not None:
                                link = PushLink.reuse(link, target[0])
                                push = functools.partial(self._push, link, target[1], metadata["step"], session_id)
                            step = self._submit_step(
                                tensors, metadata, start=start, end=end, caches=caches, batch_size=batch_size,
                                max_length=max_length, length=length, client=client,
                                separate_receipt=separate_receipts)
                            if receipt is not None:  # sign the last step's receipt while this one computes
                                await step.started
                                yield await receipt()
                                receipt = None
                            response, length, receipt = await self._finish_step(step, session_id=session_id,
                                                                                push=push)
                            yield response
                            trace.event("sent", id(caches))
                        elif metadata.get("type") == "open":  # an open without a first step gets an ack
                            yield make_response([], {"type": "opened", "cache_tokens_left": self.memory.tokens_left})
                        if receipt is None:
                            request = await reader.next(self.config.session_timeout)
                        else:  # the next step usually comes soon, and its round signs this receipt
                            request = await self._next_or_quiet(reader)
                            if request is _QUIET or request is None:  # the client waits (or left): sign it now
                                trace.event("quiet_receipt", id(caches))
                                yield await receipt()
                                receipt = None
                                if request is _QUIET:
                                    request = await reader.next(self.config.session_timeout)
                        if request is None:
                            return
                        trace.event("taken", id(caches))
                        metadata = unpack_metadata(request.metadata)
                        kind = metadata.get("type")
                        if kind in ("pay", "cancel", "flush") and self._session_id(metadata) == session_id:
                            if kind == "pay":
                                self._settle_voucher(metadata, client)  # the client's last voucher before it leaves
                            if kind == "flush" and receipt is not None:  # the client waits for it: no next step
                                yield await receipt()
                                receipt = None
                            request.ClearField("tensors")  # a cancel that came after its push was served
                            metadata["type"] = "paid"
                            continue
                        if metadata.get("type") != "step" or self._session_id(metadata) != session_id:
                            raise NodeRPCError(
                                ErrorCode.UNKNOWN_SESSION,
                                f"step names session {metadata.get('session_id')!r}, this stream serves another",
                            )
                    except NodeRPCError:
                        if receipt is not None:  # work done before a bad request is still signed for
                            yield await receipt()
                            receipt = None
                        raise
            finally:
                self.active_sessions -= 1
                if slot is not None:
                    self.inbox.close(session_id, slot)
                if link is not None:
                    link.close()
                del caches

    async def _next_or_quiet(self, reader: "_Requests"):
        """The next request, or ``_QUIET`` once the stream has been quiet for ``receipt_delay`` s while the compute
        thread is not gathering other sessions' steps (signing then would hold up their requests), or for at most
        five times that in any case."""
        for _ in range(5):
            request = await reader.next(self.config.receipt_delay, quiet=_QUIET)
            if request is not _QUIET or not self.compute.gathering:
                return request
        return request

    def _push_token(self, metadata: dict) -> Optional[bytes]:
        token = metadata.get("push_token")
        if token is not None and (not isinstance(token, bytes) or not 16 <= len(token) <= 32):
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "push_token must be 16 to 32 random bytes")
        return token

    async def _await_push(self, slot, metadata: dict, reader: "_Requests") -> Optional[list[torch.Tensor]]:
        """The pushed input of this step, or None once the client cancels (it relays the step instead)."""
        if slot is None:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "a pushed step needs a push_token in the session's open")
        step = self._int(metadata, "step", 0, 2**63 - 1)
        slot.forget_until(step)
        arrived, client_spoke = slot.future(step), reader.readable()
        await asyncio.wait({arrived, client_spoke}, timeout=self.config.session_timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if arrived.done() and not arrived.cancelled():
            del slot.arrived[step]
            return [arrived.result()]
        if client_spoke.done():
            cancel = await reader.next(0)
            cancel_meta = unpack_metadata(cancel.metadata) if cancel is not None else {}
            if cancel is None or cancel_meta.get("type") != "cancel" or cancel_meta.get("step") != step:
                raise NodeRPCError(ErrorCode.BAD_REQUEST,
                                   f"step {step} waits for its push; send {{'type': 'cancel', 'step': {step}}} "
                                   "before anything else on this stream")
        return None

    @staticmethod
    def _push_target(metadata: dict) -> Optional[tuple[str, bytes]]:
        """(next hop's direct address, its push token) if this step's output goes there too."""
        target = metadata.get("push_to")
        if target is None:
            return None
        address, token = (target.get("address"), target.get("token")) if isinstance(target, dict) else (None, None)
        try:
            parse_address(address)
        except (ValueError, AttributeError):
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"push_to.address must be HOST:PORT, got {address!r}")
        if not isinstance(token, bytes):
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "push_to.token must be the next hop's push token (bytes)")
        return address, token

    async def _push(self, link: PushLink, token: bytes, step: int, session_id: bytes, packed) -> None:
        """Sends this step's output to the next hop; a failure is logged and left to the client's push timeout."""
        push = runtime_pb2.ExpertRequest(tensors=packed, metadata=pack_metadata(
            {"session_id": session_id, "step": step, "token": token}))
        try:
            await link.send(push)
            trace.event("push_sent", step)
            self.pushes_sent += 1
        except Exception as e:
            logger.debug(f"Push to {link.address} failed ({type(e).__name__}: {e}); the client will relay",
                         exc_info=True)
            link.close()

    def _submit_step(self, tensors, metadata, *, start, end, caches, batch_size, max_length, length, client,
                     separate_receipt) -> "_Step":
        """Checks a step and queues it on the compute thread (it shares a forward with other sessions' steps)."""
        began = time.perf_counter()
        if not 1 <= len(tensors) <= 2:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "a step carries hidden_states and optionally prompts")
        hidden, prompts = tensors[0], (tensors[1] if len(tensors) > 1 else None)
        self._check_hidden(hidden, batch_size=batch_size)
        self._check_prompts(prompts, hidden, start, end)
        step = self._int(metadata, "step", 0, 2**63 - 1)
        position = self._int(metadata, "position", 0, length, default=length)
        if position + hidden.shape[1] > max_length:
            raise NodeRPCError(
                ErrorCode.TOO_LARGE,
                f"tokens {position}..{position + hidden.shape[1]} exceed the session's max_length {max_length}",
            )
        if not separate_receipt:
            self._settle_voucher(metadata, client)
        tokens = hidden.shape[0] * hidden.shape[1]
        self.credit.check_credit(client, tokens * self.signer.price_for(start, end))
        task = self.backend.inference_task(hidden, caches, start=start, end=end, position=position, prompts=prompts)
        started = asyncio.get_running_loop().create_future()
        output = self.compute.submit(task, Priority.INFERENCE, started=started)
        trace.event("submitted", id(caches))
        self.step_seconds += time.perf_counter() - began
        return _Step(output, started, hidden, prompts, metadata, step, position, start, end, client, tokens,
                     separate_receipt)

    async def _finish_step(self, step: "_Step", *, session_id: bytes, push=None):
        """(response, new cache length, None) or, for a separate receipt, (the output without its receipt, new
        length, a coroutine function that signs the receipt and returns its own message).

        A separate receipt is signed (or handed to the signing process) only when the session's next step starts
        computing, or the stream goes quiet: between a round's end and the next round's start, the event loop's
        time goes to sending outputs and taking next steps, one session after another."""
        outputs = await step.output
        began = time.perf_counter()
        outputs = self._maybe_corrupt(outputs)
        packed = pack_tensors([outputs])
        if push is not None:  # before the receipt and the reply: the next hop computes while this node signs
            await push(packed)
        self.audit.record(session_id, step.step, step.position, step.hidden, step.start, step.end,
                          prompts=step.prompts if step.position == 0 else None)
        new_length = step.position + step.hidden.shape[1]

        pending = self.signing.prepare(session_id=session_id, step=step.step, kind=schema.ReceiptKind.INFERENCE,
                                       start=step.start, end=step.end, client=step.client, tokens=step.tokens,
                                       inputs=step.hidden, outputs=outputs)

        async def receipt_message() -> runtime_pb2.ExpertResponse:
            began = time.perf_counter()
            # the voucher, too, is checked once the output is out (the credit check used the last one): a bad
            # voucher then ends the stream here, and the client fails over from this node
            self._settle_voucher(step.metadata, step.client)
            waited = time.perf_counter()
            reply = await self._receipt_reply(pending, step.client)
            began += time.perf_counter() - waited - pending.loop_seconds  # waiting for the signing process is not
            message = make_response([], {"type": "receipt", "step": step.step, **reply})  # the loop's own work
            self.step_seconds += time.perf_counter() - began
            return message

        if step.separate_receipt:
            reply, follow_up = {"receipt_follows": True}, receipt_message
        else:
            waited = time.perf_counter()
            reply, follow_up = await self._receipt_reply(pending, step.client), None
            began += time.perf_counter() - waited - pending.loop_seconds
        reply["cache_tokens_left"] = self.memory.tokens_left
        self.step_seconds += time.perf_counter() - began
        return runtime_pb2.ExpertResponse(tensors=packed, metadata=pack_metadata(reply)), new_length, follow_up

    async def _single_request(self, requests) -> tuple[runtime_pb2.ExpertRequest, dict]:
        request = await _Requests(requests).next(self.config.step_timeout)
        if request is None:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "empty request stream")
        return request, unpack_metadata(request.metadata)

    async def rpc_forward(self, requests: RequestStream, context: P2PContext):
        request, metadata = await self._single_request(requests)
        start, end = self._check_span(request.uid)
        tensors = unpack_tensors(request.tensors)
        if not 1 <= len(tensors) <= 2:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "forward takes hidden_states and optionally prompts")
        hidden, prompts = tensors[0], (tensors[1] if len(tensors) > 1 else None)
        self._check_hidden(hidden)
        self._check_prompts(prompts, hidden, start, end)
        client = self._client(metadata)
        self._settle_voucher(metadata, client)
        tokens = hidden.shape[0] * hidden.shape[1]
        self.credit.check_credit(client, tokens * self.signer.price_for(start, end))
        outputs = await self.compute.submit(
            lambda: self.backend.forward(hidden, start=start, end=end, prompts=prompts,
                                         keep_graph=metadata.get("backward", True) is not False),  # see backend
            Priority.FORWARD,
        )
        reply = await self._sign(session_id=self._call_session_id(metadata),
                           step=self._int(metadata, "step", 0, 2**63 - 1, default=0), kind=schema.ReceiptKind.FORWARD,
                           start=start, end=end, client=client, tokens=tokens, inputs=hidden, outputs=outputs)
        yield make_response([outputs], reply)

    async def rpc_backward(self, requests: RequestStream, context: P2PContext):
        request, metadata = await self._single_request(requests)
        start, end = self._check_span(request.uid)
        tensors = unpack_tensors(request.tensors)
        if not 2 <= len(tensors) <= 3:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "backward takes hidden_states, grad_outputs and maybe prompts")
        hidden, grad_outputs = tensors[0], tensors[1]
        prompts = tensors[2] if len(tensors) > 2 else None
        self._check_hidden(hidden)
        self._check_hidden(grad_outputs, batch_size=hidden.shape[0], what="grad_outputs")
        if grad_outputs.shape != hidden.shape:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"grad_outputs {list(grad_outputs.shape)} must match "
                                                      f"hidden_states {list(hidden.shape)}")
        self._check_prompts(prompts, hidden, start, end)
        client = self._client(metadata)
        self._settle_voucher(metadata, client)
        tokens = hidden.shape[0] * hidden.shape[1]
        self.credit.check_credit(client, tokens * self.signer.price_for(start, end))
        grad_inputs, grad_prompts = await self.compute.submit(
            lambda: self.backend.backward(hidden, grad_outputs, start=start, end=end, prompts=prompts),
            Priority.BACKWARD,
        )
        reply = await self._sign(session_id=self._call_session_id(metadata),
                           step=self._int(metadata, "step", 0, 2**63 - 1, default=0), kind=schema.ReceiptKind.BACKWARD,
                           start=start, end=end, client=client, tokens=tokens, inputs=grad_outputs,
                           outputs=grad_inputs)
        yield make_response([grad_inputs] + ([grad_prompts] if grad_prompts is not None else []), reply)

    async def rpc_audit(self, requests: RequestStream, context: P2PContext):
        """Returns a session's inputs up to a step, for spot checks by the ledger."""
        request, metadata = await self._single_request(requests)
        session_id = self._session_id(metadata)
        step = self._int(metadata, "step", 0, 2**63 - 1)
        found = self.audit.history(session_id, step)
        if found is None:
            raise NodeRPCError(ErrorCode.UNKNOWN_SESSION, f"no audit record for this session at step {step} "
                                                          "(expired or never served here)")
        inputs, (start, end), prompts = found
        # deep prompts of the first step are part of the computation: a verifier must add them too
        yield make_response([inputs] + ([prompts] if prompts is not None else []), {"start": start, "end": end})

    async def rpc_push(self, requests: RequestStream, context: P2PContext):
        """Hidden states the previous hop of a session pushes here (see ``nectar.node.push``); one ack each."""
        async for request in requests:
            metadata = unpack_metadata(request.metadata)
            session_id = self._session_id(metadata)
            token = metadata.get("token")
            if not isinstance(token, bytes):
                raise NodeRPCError(ErrorCode.BAD_REQUEST, "a push names its session's push token (bytes)")
            slot = self.inbox.find(session_id, token)
            step = self._int(metadata, "step", 0, 2**63 - 1)
            tensors = unpack_tensors(request.tensors)
            if len(tensors) != 1:
                raise NodeRPCError(ErrorCode.BAD_REQUEST, f"a push carries 1 hidden_states tensor, not {len(tensors)}")
            self._check_hidden(tensors[0], batch_size=slot.batch_size)
            self.inbox.deliver(slot, step, tensors[0])
            trace.event("push_in", step)
            yield make_response([], {"ok": True})


def _all_finite(tensor: torch.Tensor) -> bool:
    # numpy where it can: a torch op on the event loop costs several times more while the compute thread runs
    if tensor.dtype in (torch.float32, torch.float16, torch.float64) and tensor.device.type == "cpu":
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


@dataclass
class _Step:
    """An inference step on its way through the compute thread."""

    output: asyncio.Future
    started: asyncio.Future  # its round began
    hidden: torch.Tensor
    prompts: Optional[torch.Tensor]
    metadata: dict
    step: int
    position: int
    start: int
    end: int
    client: str
    tokens: int
    separate_receipt: bool


_QUIET = object()  # ``_Requests.next``: no request came in time, the stream is still open


class _Requests:
    """A stream's requests with the node's timeouts: a session idle for too long expires."""

    def __init__(self, stream: RequestStream):
        self.stream = stream

    async def next(self, timeout: float, *, quiet=None):
        """The next request, None at the end of the stream; ``quiet`` (if given) instead of expiring."""
        try:
            return await self.stream.next(timeout if timeout > 0 else None)
        except RequestTimeout:
            if quiet is not None:
                return quiet
            raise NodeRPCError(
                ErrorCode.SESSION_EXPIRED,
                f"no request for {timeout:.0f}s, the session's cache was freed; open a new session and replay",
            )

    def readable(self) -> asyncio.Future:
        """Done once a request is queued (nothing is taken)."""
        return self.stream.readable()
