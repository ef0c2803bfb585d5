"""What every unit of a node's work goes through: check, submit to the compute thread, finish, sign and charge.

Inference steps (``nectar.node.inference_stream``), forward and backward calls share it. A request's own fields are
checked on decode (``nectar.wire.messages``); the checks here need the node: its span, hidden size, cache and
credit.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.proto import runtime_pb2

from nectar.node import trace
from nectar.node.audit import AuditLog
from nectar.node.backend import SpanBackend
from nectar.node.config import NodeConfig
from nectar.node.memory_cache import MemoryCache
from nectar.node.payments import NoPaymentPolicy, PaymentPolicy
from nectar.node.receipts import ClientGate, ClientVouchers, CreditLedger, ReceiptSigner
from nectar.node.signed_work import JournalFull, SignedWork, State
from nectar.node.signing import InlineSigning, PendingReceipt, SigningWorker
from nectar.node.task_pool import ComputeThread, Priority
from nectar.wire import fingerprints
from nectar.wire import receipts as schema
from nectar.wire.messages import BackwardCall, BackwardReply, ForwardCall, ForwardReply, ReceiptMessage, Step, StepReply
from nectar.wire.protocol import (
    MAX_BATCH_SIZE,
    MAX_TOKENS_PER_REQUEST,
    ErrorCode,
    NodeRPCError,
    pack_tensors,
    parse_module_uid,
)

FollowUp = Callable[[], Awaitable[ReceiptMessage]]  # signs a step's separate receipt


async def _written(future) -> None:
    """Waits (off the event loop) until the audit log's writer has the step's record; raises its write error."""
    if not future.done():
        await asyncio.wrap_future(future)
    future.result()


@dataclass
class InferenceWork:
    """An inference step on its way through the compute thread."""

    output: asyncio.Future
    started: asyncio.Future  # its round began: how many steps the round has
    hidden: torch.Tensor
    prompts: torch.Tensor | None
    voucher: dict | None
    step: int
    position: int
    start: int
    end: int
    client: str
    tokens: int
    separate_receipt: bool
    key: bytes  # its work key (``nectar.node.signed_work``)
    vouchers: ClientVouchers  # its client's
    replay: tuple | None = None  # (receipt JSON, fingerprint, position) signed before for this key: sent again
    adapter: str | None = None  # the LoRA adapter it is computed with


class NodeSteps:
    """A node's parts that work goes through, and the checks, submission, signing and charging they share.
    ``backend`` and ``memory`` are replaced when the node moves to another span."""

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
        signing: InlineSigning | SigningWorker | None = None,
        signed_work: SignedWork | None = None,
    ):
        self.backend, self.config, self.model_id = backend, config, model_id
        self.compute, self.memory, self.signer, self.credit, self.audit = compute, memory, signer, credit, audit
        self.payments = payments or NoPaymentPolicy()
        self.signing = signing or InlineSigning(signer)  # the default signs on the event loop
        self.signed_work = signed_work if signed_work is not None else SignedWork(None)  # in memory by default
        self.step_seconds = 0.0  # event-loop time of inference steps outside compute (checks, receipts, packing)
        self.receipts_riding = 0  # receipts sent in the next step's answer (``Open.receipts_ride``)
        self.evaded: set[tuple[bytes, int]] = set()  # testing only (evade_audits): corrupted steps it will not audit
        self.gate = ClientGate(signer.address)  # who signed an open or call: the only client it bills (issue 22)
        self.vouchers: dict[str, ClientVouchers] = {}  # clients with open sessions -> their unchecked vouchers

    def authenticate(self, message, peer_id: str) -> str:
        """The verified client of an open or forward/backward call (``ClientGate``)."""
        return self.gate.client_of(message, peer_id)

    # ---- checks -----------------------------------------------------------------------------------------------

    def check_span(self, uid: str) -> tuple[int, int]:
        model_id, start, end = parse_module_uid(uid)
        if model_id != self.model_id:
            raise NodeRPCError(ErrorCode.WRONG_SPAN, f"this node serves model {self.model_id!r}, not {model_id!r}")
        if not (self.backend.start <= start < end <= self.backend.end):
            raise NodeRPCError(
                ErrorCode.WRONG_SPAN,
                f"blocks {start}:{end} requested, this node hosts {self.backend.start}:{self.backend.end}",
            )
        return start, end

    def check_hidden(self, tensor: torch.Tensor, *, batch_size: int | None = None, what="hidden_states") -> None:
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

    def check_adapter(self, name: str | None) -> str | None:
        """``name`` if this node serves that adapter (None: the base model), else ``UNKNOWN_ADAPTER``. The name was
        checked to be a plain name on decode; only the operator's folders are ever loaded."""
        if name is not None and name not in self.backend.adapters:
            served = ", ".join(self.backend.adapters.names) or "none"
            raise NodeRPCError(
                ErrorCode.UNKNOWN_ADAPTER,
                f"this node serves no adapter {name!r} (it serves: {served}); route to a node that announces it",
            )
        return name

    def adapter_fields(self, name: str | None) -> dict:
        """The receipt binds the adapter a step was computed with: its digest in the compute descriptor."""
        return {} if name is None else {"adapter": self.backend.adapters.adapters[name].digest}

    @staticmethod
    def check_prompts(prompts: torch.Tensor | None, hidden: torch.Tensor, start: int, end: int) -> None:
        if prompts is None:
            return
        expected = (end - start, hidden.shape[0])
        if prompts.ndim != 4 or tuple(prompts.shape[:2]) != expected or prompts.shape[-1] != hidden.shape[-1]:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"prompts must have shape [{end - start}, {hidden.shape[0]}, prefix, {hidden.shape[-1]}], "
                f"got {list(prompts.shape)}",
            )

    def check_credit(self, client: str, tokens: int, start: int, end: int, *, opening: bool = False) -> bool:
        """See ``CreditLedger.check_credit``: whether the client pays on credit of its own."""
        return self.credit.check_credit(client, tokens * self.signer.price_for(start, end), opening=opening)

    async def refresh_backing(self, client: str, tokens: int, start: int, end: int) -> None:
        """Asks the ledger for a client short of backing off the event loop (``check_credit`` then finds the fresh
        answer): an open or call from an address nothing backs must not stall every other session's steps."""
        if self.credit.short(client, tokens * self.signer.price_for(start, end)):
            await asyncio.to_thread(self.credit.backing.refresh, client)

    # ---- payment ----------------------------------------------------------------------------------------------

    def session_vouchers(self, client: str) -> ClientVouchers:
        """The vouchers of a client opening a session, their signatures checked lazily (``ClientVouchers``, shared by
        its sessions; forgotten when its last one ends: ``ClientVouchers.session_ended``)."""
        vouchers = self.vouchers.get(client)
        if vouchers is None:
            vouchers = self.vouchers[client] = ClientVouchers(
                self.credit, client, interval=self.config.voucher_check_interval, accepted=self.payments.on_voucher
            )
        vouchers.sessions += 1
        return vouchers

    def session_ended(self, vouchers: ClientVouchers) -> None:
        vouchers.session_ended()
        if vouchers.sessions <= 0 and self.vouchers.get(vouchers.client) is vouchers:
            del self.vouchers[vouchers.client]

    def settle_voucher(self, voucher: dict | None, client: str) -> None:
        if voucher is not None:
            signed = self.credit.accept_voucher(voucher, client)
            if signed is not None:
                self.payments.on_voucher(signed)

    async def receipt_of(
        self, pending: PendingReceipt, client: str, key: bytes, *, position: int | None = None
    ) -> tuple[dict, bytes]:
        """(the receipt's JSON, its fingerprint) once signed and journaled under its work key (before it leaves the
        node); the client is charged for it. An inference step's (``position``) is kept for a retry of the step."""
        signed, fingerprint, receipt_json = await pending.result()
        replay = (receipt_json, fingerprint, position) if position is not None else None
        self.signed_work.signed(key, signed.receipt.input_commitment, replay)
        self.credit.charge(client, signed.receipt.amount)
        self.payments.on_receipt(signed, fingerprint)
        return receipt_json, fingerprint

    def take_work(self, key: bytes, inputs: torch.Tensor, step: int, position: int | None = None) -> tuple | None:
        """Reserves a work key before its step computes. A key signed before gets its receipt again for the same
        input at the same position (a retry), an error otherwise: a node never signs two receipts for one key (a
        double-sign), and sends a receipt only with the step it committed to."""
        try:
            state = self.signed_work.take(key)
        except JournalFull as e:
            raise NodeRPCError(ErrorCode.CACHE_FULL, f"{e}: try another node")
        if state is None:
            return None
        if state != State.SIGNED:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"step {step} of this session is being computed here already; each step number is signed once: "
                "wait for its answer, or send the next step number",
            )
        kept = self.signed_work.replay(key)
        if kept is None:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"step {step} of this session was signed already and its receipt went out with its answer; send "
                "the next step number, or open a new session to replay",
            )
        input_commitment, replay = kept
        if fingerprints.commit_tensor(inputs) != input_commitment:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"step {step} of this session was signed already, for another input; a node signs one receipt per "
                "(session, blocks, kind, step): send new input under the next step number",
            )
        if replay[2] != position:  # the same input in another cache state gives another output
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"step {step} of this session was signed already at position {replay[2]}, not {position}; a retry "
                "goes where the step went: send new work under the next step number",
            )
        return replay

    def maybe_corrupt(self, outputs: torch.Tensor) -> torch.Tensor:
        # Testing aid: a dishonest node, so spot checks can be shown to catch one.
        if self.config.corrupt_rate > 0 and random.random() < self.config.corrupt_rate:
            scale = outputs.abs().mean().clamp_min(1e-3) * self.config.corrupt_scale
            return outputs + torch.randn_like(outputs) * scale
        return outputs

    # ---- inference steps --------------------------------------------------------------------------------------

    def submit_inference(
        self,
        message: Step,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        *,
        session_id: bytes,
        caches,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        length: int,
        client: str,
        separate_receipt: bool,
        vouchers: ClientVouchers,
        adapter: str | None = None,
    ) -> InferenceWork:
        """Checks a step against the session and queues it on the compute thread (it shares a forward with other
        sessions' steps)."""
        began = time.perf_counter()
        self.check_hidden(hidden, batch_size=batch_size)
        self.check_prompts(prompts, hidden, start, end)
        position = length if message.position is None else message.position
        if position > length:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"position must be an integer in [0, {length}], got {position}")
        if position + hidden.shape[1] > max_length:
            raise NodeRPCError(
                ErrorCode.TOO_LARGE,
                f"tokens {position}..{position + hidden.shape[1]} exceed the session's max_length {max_length}",
            )
        if not separate_receipt:
            vouchers.offer(message.voucher)
        tokens = hidden.shape[0] * hidden.shape[1]
        vouchers.check_credit(tokens * self.signer.price_for(start, end))
        # refused (cache_full) rather than served if its audit record could not be kept for the retention
        self.audit.admit(_record_bytes(hidden, prompts), new=False)
        key = schema.work_key(session_id, start, end, schema.ReceiptKind.INFERENCE, message.step)
        replay = self.take_work(key, hidden, message.step, position)
        task = self.backend.inference_task(
            hidden, caches, start=start, end=end, position=position, prompts=prompts, adapter=adapter
        )
        started = asyncio.get_running_loop().create_future()
        output = self.compute.submit(task, Priority.INFERENCE, started=started)
        trace.event("submitted", id(caches))
        self.step_seconds += time.perf_counter() - began
        return InferenceWork(
            output,
            started,
            hidden,
            prompts,
            message.voucher,
            message.step,
            position,
            start,
            end,
            client,
            tokens,
            separate_receipt,
            key,
            vouchers,
            replay,
            adapter,
        )

    async def finish_inference(
        self,
        work: InferenceWork,
        *,
        session_id: bytes,
        push: Callable[[list], Awaitable[None]] | None = None,
        session_nonce: bytes | None = None,
        previous: ReceiptMessage | None = None,
    ) -> tuple[runtime_pb2.ExpertResponse, int, FollowUp | None]:
        """(the step's reply, new cache length, None) or, for a separate receipt, (the output without its receipt,
        new length, a coroutine function that signs the receipt and returns its message). ``previous``: the session's
        last receipt, to ride in this reply (``Open.receipts_ride``).

        A separate receipt is signed (or handed to the signing process) only when the session's next step starts
        computing, or the stream goes quiet: between a round's end and the next round's start, the event loop's
        time goes to sending outputs and taking next steps, one session after another. The step's audit record is
        written then too, just before its receipt is signed (a receipt never leaves before its record; an output
        whose receipt is never signed needs none). The next step's ``audit.admit`` does not count it yet: the
        budget's slack for steps already computing covers one record per session.

        ``session_id`` is the bound one (``bind_session``); ``session_nonce`` goes with the session's first answer."""
        try:
            outputs = await work.output
        except BaseException:
            if work.replay is None:
                self.signed_work.release(work.key)  # nothing was signed for it
            raise
        began = time.perf_counter()
        computed, outputs = outputs, self.maybe_corrupt(outputs)
        if outputs is not computed and self.config.evade_audits:
            self.evaded.add((session_id, work.step))
        packed = pack_tensors([outputs])
        if push is not None:  # before the receipt and the reply: the next hop computes while this node signs
            await push(packed)
        new_length = work.position + work.hidden.shape[1]

        def record():
            """Keeps the step for audits (a retry's input is recorded already): before its receipt is signed, never
            before its output is sent where the receipt follows (a small record is written on the loop: ~0.2 ms)."""
            if work.replay is None:
                return self.audit.record(
                    session_id,
                    work.step,
                    work.position,
                    work.hidden,
                    work.start,
                    work.end,
                    prompts=work.prompts if work.position == 0 else None,
                    outputs=outputs,  # as sent (after any corruption): what the receipt's output commitment hashes
                )
            return None

        pending = (
            None
            if work.replay is not None
            else self.signing.prepare(
                session_id=session_id,
                step=work.step,
                kind=schema.ReceiptKind.INFERENCE,
                start=work.start,
                end=work.end,
                client=work.client,
                tokens=work.tokens,
                inputs=work.hidden,
                outputs=outputs,
                **self.adapter_fields(work.adapter),
            )
        )

        async def receipt_message() -> ReceiptMessage:
            began = time.perf_counter()
            # the voucher, too, is checked once the output is out (the credit check used the last one): a bad
            # voucher then ends the stream here, and the client fails over from this node
            work.vouchers.offer(work.voucher)
            written = record()
            waited = time.perf_counter()
            if written is not None:  # on disk before the receipt is signed
                await _written(written)
            receipt, fingerprint = await self._receipt_of(work, pending)
            # waiting for the record and the signer is not the loop's work
            began += time.perf_counter() - waited - (pending.loop_seconds if pending else 0)
            self.step_seconds += time.perf_counter() - began
            return ReceiptMessage(work.step, receipt, fingerprint)

        if work.separate_receipt:
            receipt = fingerprint = None
            follow_up = receipt_message
        else:
            written = record()
            waited = time.perf_counter()
            if written is not None:
                await _written(written)
            receipt, fingerprint = await self._receipt_of(work, pending)
            began += time.perf_counter() - waited - (pending.loop_seconds if pending else 0)
            follow_up = None
        if previous is not None:
            self.receipts_riding += 1
        reply = StepReply(
            outputs,
            receipt,
            fingerprint,
            follow_up is not None,
            self.memory.tokens_left,
            session_nonce,  # in the answer to an open that carried this step
            previous,
        )
        response = reply.to_response(packed)
        self.step_seconds += time.perf_counter() - began
        return response, new_length, follow_up

    async def _receipt_of(self, work: InferenceWork, pending: PendingReceipt | None) -> tuple[dict, bytes]:
        if pending is None:  # a retried step: the receipt signed before, charged then
            return work.replay[:2]
        return await self.receipt_of(pending, work.client, work.key, position=work.position)

    # ---- forward and backward ---------------------------------------------------------------------------------

    async def forward(self, call: ForwardCall, client: str, *, free: bool = False) -> ForwardReply:
        """``client``: the call's verified signer (``authenticate``); ``free``: serve without credit (a registered
        verifier re-executing a step for an audit)."""
        start, end = self.check_span(call.uid)
        adapter = self.check_adapter(call.adapter)
        hidden, prompts = call.hidden, call.prompts
        self.check_hidden(hidden)
        self.check_prompts(prompts, hidden, start, end)
        outputs, receipt, fingerprint, nonce = await self._charged_call(
            call,
            start,
            end,
            hidden,
            lambda: self.backend.forward(
                hidden, start=start, end=end, prompts=prompts, keep_graph=call.backward, adapter=adapter
            ),
            kind=schema.ReceiptKind.FORWARD,
            priority=Priority.FORWARD,
            signed=lambda outputs: (hidden, outputs),
            client=client,
            free=free,
        )
        return ForwardReply(outputs, receipt, fingerprint, nonce)

    async def backward(self, call: BackwardCall, client: str) -> BackwardReply:
        start, end = self.check_span(call.uid)
        adapter = self.check_adapter(call.adapter)
        hidden, grad_outputs, prompts = call.hidden, call.grad_outputs, call.prompts
        self.check_hidden(hidden)
        self.check_hidden(grad_outputs, batch_size=hidden.shape[0], what="grad_outputs")
        if grad_outputs.shape != hidden.shape:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"grad_outputs {list(grad_outputs.shape)} must match hidden_states {list(hidden.shape)}",
            )
        self.check_prompts(prompts, hidden, start, end)
        (grad_inputs, grad_prompts), receipt, fingerprint, nonce = await self._charged_call(
            call,
            start,
            end,
            hidden,
            lambda: self.backend.backward(hidden, grad_outputs, start=start, end=end, prompts=prompts, adapter=adapter),
            kind=schema.ReceiptKind.BACKWARD,
            priority=Priority.BACKWARD,
            signed=lambda result: (grad_outputs, result[0]),
            client=client,
        )
        return BackwardReply(grad_inputs, grad_prompts, receipt, fingerprint, nonce)

    async def _charged_call(
        self, call, start: int, end: int, hidden: torch.Tensor, work, *, kind, priority, signed, client, free=False
    ):
        """What forward and backward share once their inputs are checked: the voucher, the credit for the call's
        tokens, the computation, and the receipt over ``signed(result)`` = (what came in, what goes out).

        The receipt's session id is bound to a nonce drawn for this call (returned with it): no two calls share a
        work key, whatever session id and step the client sends."""
        if kind == schema.ReceiptKind.FORWARD:  # audited: refused unless its record can be kept (new work)
            self.audit.admit(_record_bytes(hidden, call.prompts), new=True)
        self.settle_voucher(call.voucher, client)
        tokens = hidden.shape[0] * hidden.shape[1]
        if not free:
            await self.refresh_backing(client, tokens, start, end)
            self.check_credit(client, tokens, start, end)
        nonce = os.urandom(schema.SESSION_NONCE_BYTES)
        session_id = schema.bind_session(call.session_id or bytes(32), nonce)
        key = schema.work_key(session_id, start, end, kind, call.step)
        self.take_work(key, hidden, call.step)  # free: the nonce is fresh
        try:
            result = await self.compute.submit(work, priority)
        except BaseException:
            self.signed_work.release(key)
            raise
        inputs, outputs = signed(result)
        if kind == schema.ReceiptKind.FORWARD:  # audited like an inference step: its input and output as sent
            written = self.audit.record(
                session_id, call.step, 0, inputs, start, end, prompts=call.prompts, outputs=outputs
            )
            await _written(written)  # on disk: before the receipt is signed
        pending = self.signing.prepare(
            session_id=session_id,
            step=call.step,
            kind=kind,
            start=start,
            end=end,
            client=client,
            tokens=tokens,
            inputs=inputs,
            outputs=outputs,
            **self.adapter_fields(call.adapter),
        )
        receipt, fingerprint = await self.receipt_of(pending, client, key)
        return result, receipt, fingerprint, nonce


def _record_bytes(hidden: torch.Tensor, prompts: torch.Tensor | None) -> int:
    """An audit record's size: the inputs, an output of their shape, the prompts."""
    return 2 * hidden.nbytes + (prompts.nbytes if prompts is not None else 0) + 256


def _all_finite(tensor: torch.Tensor) -> bool:
    # numpy where it can: a torch op on the event loop costs several times more while the compute thread runs
    if tensor.dtype in (torch.float32, torch.float16, torch.float64) and tensor.device.type == "cpu":
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())
