"""One inference stream at a node: a session with a server-side KV cache, as an explicit state machine.

    OPENING ──open──> IDLE <──────── output (inline receipt) ─────────┐
       │                │ step                                        │
       │ open+step      v                                             │
       └──────────> COMPUTING ──output (receipt follows)──> RECEIPT_PENDING
                        ^                                     │ step: its round signs the receipt
                        │ pushed input                        │ quiet / flush / end: sign it now
                  AWAITING_PUSH <── pushed step (from IDLE or RECEIPT_PENDING; the receipt goes out first)
                        │ cancel ──> IDLE (push_missing)

Any state ──end of stream or error──> CLOSED; work done before a bad request is still signed for (its receipt goes
out before the error). Each transition emits at most one message, which ``run`` yields to the transport.

A separate receipt is signed while the session's next step computes (after that round has started), or once the
stream has been quiet for ``receipt_delay``: signing is most of a step's event-loop time, and a node serving many
sessions would otherwise sign between a round's outputs and its sessions' next requests. A step that comes while a
quiet receipt is being signed goes to the compute thread first; the receipt still goes out before its output.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import torch
from hivemind.proto import runtime_pb2

from nectar.node import trace
from nectar.node.push import PushInbox, PushLink, PushSlot
from nectar.node.steps import FollowUp, InferenceWork, NodeSteps
from nectar.node.task_pool import Priority
from nectar.wire import receipts as schema
from nectar.wire.messages import (
    Cancel,
    Flush,
    Open,
    Opened,
    Pay,
    Push,
    PushMissing,
    ReceiptMessage,
    Step,
    decode_inference_request,
)
from nectar.wire.protocol import ErrorCode, NodeRPCError
from nectar.wire.request_stream import RequestStream, RequestTimeout

logger = logging.getLogger(__name__)


class StreamHost(Protocol):
    """What a stream needs of its node (``NodeHandler``), and the counters it keeps there."""

    steps: NodeSteps
    inbox: PushInbox
    push_allowed: Callable[[str, int], Awaitable[bool]] | None  # (address, block) -> may this node push there
    active_sessions: int
    pushes_sent: int


class State(enum.Enum):
    OPENING = "opening"  # the open is taken and its cache made, not answered yet
    IDLE = "idle"  # no step in flight, every receipt sent: waiting for the next request (or expiry)
    COMPUTING = "computing"  # a step is on the compute thread
    RECEIPT_PENDING = "receipt_pending"  # the last step's receipt is unsent: the next step's round signs it
    AWAITING_PUSH = "awaiting_push"  # a pushed step waits for its input from the previous hop, or a cancel
    CLOSED = "closed"


_QUIET = object()  # ``_next_or_quiet``: no request came in time, the stream is still open


class InferenceStream:
    """Serves one ``rpc_inference`` stream: ``async for response in InferenceStream(node, requests).run()``."""

    def __init__(self, node: StreamHost, requests: RequestStream, *, peer_id: str = ""):
        self.node, self.steps, self.requests = node, node.steps, requests
        self.peer_id = peer_id  # this node's, as the client dialled it: its open is signed for it
        self.client = ""  # the open's verified signer: the session's only billed client (issue 22)
        self.vouchers = None  # its client's (``ClientVouchers``), once the open is taken
        self.backed = True  # whether it pays on credit of its own; else its cache gives way to backed clients'
        self.evicted = False
        self._wake: asyncio.Future | None = None  # what _evict woke
        self.active_at = time.monotonic()  # the last paid step (or the open): flush and pay do not keep a cache
        self.config = node.steps.config
        self.state = State.OPENING
        self.open: Open | None = None
        # receipts name bind_session(the client's session id, a nonce drawn here), sent with the open's answer: no
        # client can make two streams (or one before and after a restart) share a work key
        self.nonce = os.urandom(schema.SESSION_NONCE_BYTES)
        self.session_id = b""  # the bound id, once open
        self.start = self.end = 0
        self.caches = None
        self.length = 0  # tokens in the session's cache
        self.slot: PushSlot | None = None  # this session's inbox for pushed inputs
        self.link: PushLink | None = None  # this session's stream to the next hop (one at a time)
        self.work: InferenceWork | None = None  # the step on the compute thread (COMPUTING)
        self.waiting: Step | None = None  # the pushed step waiting for its input (AWAITING_PUSH)
        self.receipt: FollowUp | asyncio.Future | None = None  # the last step's receipt, unsent (a future: signing)
        self.riding: ReceiptMessage | None = None  # the last step's receipt, signed, to ride in this step's answer
        self._push_output = None  # sends the computing step's output to the next hop, if it goes there
        self._sent_output = False
        self._answered = False  # a step's output went out (the first carries the nonce when the open had the step)
        self._transitions = {
            State.OPENING: self._answer_open,
            State.IDLE: self._idle,
            State.COMPUTING: self._computing,
            State.RECEIPT_PENDING: self._receipt_pending,
            State.AWAITING_PUSH: self._awaiting_push,
        }

    async def run(self) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        opening = await self._take_open()
        if opening is None:
            self.state = State.CLOSED
            return
        batch_size, max_length = opening.batch_size, opening.max_length
        nbytes = self.steps.backend.session_cache_bytes(self.start, self.end, batch_size, max_length)
        with self.steps.memory.reserve(nbytes, self.client, backed=self.backed, evict=self._evict):
            start, end = self.start, self.end
            self.caches = await self.steps.compute.submit(
                lambda: self.steps.backend.new_caches(start, end, batch_size, max_length), Priority.INFERENCE
            )
            self.node.active_sessions += 1
            if opening.push_token is not None:
                self.slot = self.node.inbox.open(opening.session_id, opening.push_token, batch_size)
            self.vouchers = self.steps.session_vouchers(self.client)  # forgotten in ``_close``
            try:
                while self.state is not State.CLOSED:
                    if self.evicted:
                        if self.receipt is not None:  # the work done is still signed for
                            yield await self._take_receipt()
                        raise self._evicted()
                    try:
                        message = await self._transitions[self.state]()
                    except Exception as e:
                        if self.riding is not None:  # signed to ride in an answer that never came: it goes alone
                            riding, self.riding = self.riding, None
                            yield riding.to_response()
                        if isinstance(e, NodeRPCError) and self.receipt is not None:
                            yield await self._take_receipt()  # work done before a bad request is still signed for
                        raise
                    if message is not None:
                        yield message
                        if self._sent_output:
                            self._sent_output = False
                            trace.event("sent", id(self.caches))
            finally:
                self._close()

    # ---- transitions ------------------------------------------------------------------------------------------

    async def _take_open(self) -> Open | None:
        """OPENING: the stream's first request must open a session on blocks this node hosts."""
        request = await self._next(self.config.session_timeout)
        if request is None:
            return None
        self.open = opening = Open.decode(request)
        self.client = self.steps.authenticate(opening, self.peer_id)
        self.start, self.end = self.steps.check_span(opening.uid)
        self.steps.check_adapter(opening.adapter)  # before any cache is reserved
        # cache is reserved only for a client that could pay for a step here (backed escrow, or trusted vouchers)
        await self.steps.refresh_backing(self.client, opening.batch_size, self.start, self.end)
        self.backed = self.steps.check_credit(self.client, opening.batch_size, self.start, self.end, opening=True)
        self.steps.audit.admit(new=True)  # no new session while its steps' audit records could not be kept
        self.session_id = schema.bind_session(opening.session_id, self.nonce)
        return opening

    async def _answer_open(self) -> runtime_pb2.ExpertResponse | None:
        """OPENING -> IDLE with an ack, or on to the step the open carries."""
        if self.open.first_step is not None:
            return await self._begin_step(self.open.first_step)
        self.state = State.IDLE
        return Opened(self.steps.memory.tokens_left, self.nonce).to_response()

    async def _idle(self) -> runtime_pb2.ExpertResponse | None:
        """IDLE: wait for the next request until ``session_timeout`` after the last paid step (then the session
        expires: a flush or pay every few seconds does not hold a cache, issue 22)."""
        timeout = self.config.session_timeout
        if timeout > 0:
            left = self.active_at + timeout - time.monotonic()
            if left <= 0:
                raise self._expired(timeout)
            return await self._on_request(await self._next(left, expiry=timeout))
        return await self._on_request(await self._next(timeout))

    async def _receipt_pending(self) -> runtime_pb2.ExpertResponse | None:
        """RECEIPT_PENDING: the next step usually comes soon, and its round signs this receipt; if the client waits
        instead (or left), sign it now. A request that comes while it is being signed is taken first: its step goes
        to the compute thread, and the receipt goes out once the round has begun (as it would have)."""
        if not isinstance(self.receipt, asyncio.Future):
            request = await self._next_or_quiet()
            if request is None:
                message = await self._take_receipt()
                self.state = State.CLOSED
                return message
            if request is not _QUIET:
                return await self._on_request(request)
            trace.event("quiet_receipt", id(self.caches))
            self.receipt = asyncio.ensure_future(self.receipt())
        readable = self.requests.readable()
        await asyncio.wait((self.receipt, readable), return_when=asyncio.FIRST_COMPLETED)
        if self.evicted:  # ``run`` sends the receipt, then ends the stream
            return None
        if not readable.done():
            return await self._take_receipt()
        request = await self.requests.next()
        if request is None:
            message = await self._take_receipt()
            self.state = State.CLOSED
            return message
        return await self._on_request(request)

    async def _on_request(self, request: runtime_pb2.ExpertRequest | None) -> runtime_pb2.ExpertResponse | None:
        """IDLE or RECEIPT_PENDING, a request taken: a step begins; pay, flush and cancel are served in place."""
        if request is None:
            self.state = State.CLOSED
            return None
        trace.event("taken", id(self.caches))
        message = decode_inference_request(request)
        if message.session_id != self.open.session_id:
            raise NodeRPCError(
                ErrorCode.UNKNOWN_SESSION,
                f"{message.TYPE} names session {message.session_id.lstrip(bytes(1))!r}, this stream serves another",
            )
        if message.__class__ is Step:
            return await self._begin_step(message)
        if message.__class__ is Pay:  # the client's last voucher before it leaves
            self.vouchers.offer(message.voucher)
            self.vouchers.settle()
        elif message.__class__ is Flush and self.receipt is not None:  # the client waits for it: no next step
            return await self._take_receipt()
        # a Cancel here came after its push was served: nothing to do
        return None

    async def _begin_step(self, step: Step) -> runtime_pb2.ExpertResponse | None:
        """-> COMPUTING, or AWAITING_PUSH for a pushed step (whose push may take a while: the last step's receipt
        need not wait for it)."""
        if step.hidden is None:
            self.waiting, self.state = step, State.AWAITING_PUSH
            return await self._take_receipt() if self.receipt is not None else None
        push = await self._push_to(step) if step.push_to is not None else None
        self._submit(step, step.hidden, step.prompts, push)
        return await self._computing()

    async def _awaiting_push(self) -> runtime_pb2.ExpertResponse | None:
        """AWAITING_PUSH -> COMPUTING once the input arrives, or -> IDLE with ``push_missing`` once the client
        cancels the step (it relays the step instead) or the session times out."""
        step, slot = self.waiting, self.slot
        if slot is None:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "a pushed step needs a push_token in the session's open")
        slot.forget_until(step.step)
        arrived, client_spoke = slot.future(step.step), self.requests.readable()
        await asyncio.wait(
            {arrived, client_spoke}, timeout=self.config.session_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        self.waiting = None
        if self.evicted:
            raise self._evicted()
        if arrived.done() and not arrived.cancelled():
            del slot.arrived[step.step]
            push = await self._push_to(step) if step.push_to is not None else None
            self._submit(step, arrived.result(), None, push)
            return await self._computing()
        if client_spoke.done():
            await self._take_cancel(step.step)
        self.state = State.IDLE
        return PushMissing().to_response()

    async def _take_cancel(self, step: int) -> None:
        request = await self.requests.next()  # it is there already
        try:
            cancel = decode_inference_request(request) if request is not None else None
        except NodeRPCError:
            cancel = None
        if cancel.__class__ is not Cancel or cancel.step != step:
            raise NodeRPCError(
                ErrorCode.BAD_REQUEST,
                f"step {step} waits for its push; send {{'type': 'cancel', "
                f"'step': {step}}} before anything else on this stream",
            )

    async def _push_to(self, step: Step) -> Callable[[list], Awaitable[None]] | None:
        """Sends the step's output to the next hop too, if it names one that announces that direct lane (a node
        pushes only to announced lanes, so a client cannot point it at any host and port)."""
        target = step.push_to
        if self.link is None or self.link.address != target.address:
            allowed = self.node.push_allowed
            if allowed is not None and not await allowed(target.address, self.end):
                logger.warning(
                    f"Not pushing to {target.address}: no node serving block {self.end} "
                    "announces that direct lane (the client relays the step)"
                )
                return None
        self.link = PushLink.reuse(self.link, target.address)
        return functools.partial(self._push, self.link, target.token, step.step)

    def _submit(self, step: Step, hidden: torch.Tensor, prompts: torch.Tensor | None, push) -> None:
        """-> COMPUTING: the step goes to the compute thread."""
        opening = self.open
        self.work = self.steps.submit_inference(
            step,
            hidden,
            prompts,
            session_id=self.session_id,
            caches=self.caches,
            start=self.start,
            end=self.end,
            batch_size=opening.batch_size,
            max_length=opening.max_length,
            length=self.length,
            client=self.client,
            separate_receipt=opening.separate_receipts,
            vouchers=self.vouchers,
            adapter=opening.adapter,
        )
        self._push_output = push
        self.active_at = time.monotonic()  # a paid step (its credit was checked): the session is in use
        self.state = State.COMPUTING

    async def _computing(self) -> runtime_pb2.ExpertResponse:
        """COMPUTING: the last step's receipt is signed once this step's round has begun, and goes out then, or,
        where the client takes riding receipts and the round serves other sessions too (the loop is what bounds
        such a node), with this step's output; then this step's output goes out -> RECEIPT_PENDING (its receipt
        follows) or IDLE (the receipt rode along)."""
        if self.receipt is not None:
            steps_in_round = await self.work.started
            if not (self.open.receipts_ride and steps_in_round > 1):
                return await self._take_receipt()
            self.riding = await self._take_receipt_message()  # sent alone instead, should this step fail
        work, self.work = self.work, None
        first = self.open.first_step is not None and not self._answered
        response, self.length, self.receipt = await self.steps.finish_inference(
            work,
            session_id=self.session_id,
            push=self._push_output,
            session_nonce=self.nonce if first else None,
            previous=self.riding,
        )
        self.riding = None
        self._answered = True
        self._push_output = None
        self.state = State.RECEIPT_PENDING if self.receipt is not None else State.IDLE
        self._sent_output = True
        return response

    # ---- helpers ----------------------------------------------------------------------------------------------

    async def _take_receipt(self) -> runtime_pb2.ExpertResponse:
        """Signs the last step's receipt, or takes the one being signed: its message."""
        return (await self._take_receipt_message()).to_response()

    async def _take_receipt_message(self) -> ReceiptMessage:
        receipt, self.receipt = self.receipt, None
        if self.state is State.RECEIPT_PENDING:
            self.state = State.IDLE
        return await (receipt if isinstance(receipt, asyncio.Future) else receipt())

    async def _push(self, link: PushLink, token: bytes, step: int, packed) -> None:
        """Sends this step's output to the next hop; a failure is logged and left to the client's push timeout."""
        try:
            await link.send(Push(self.open.session_id, step, token).to_request(packed))
            trace.event("push_sent", step)
            self.node.pushes_sent += 1
        except Exception as e:
            logger.debug(
                f"Push to {link.address} failed ({type(e).__name__}: {e}); the client will relay", exc_info=True
            )
            link.close()

    async def _next(self, timeout: float, *, expiry: float | None = None):
        """The next request, None at the end of the stream; a session idle for ``timeout`` s expires."""
        try:
            return await self.requests.next(timeout if timeout > 0 else None)
        except RequestTimeout:
            if self.evicted:
                raise self._evicted()
            raise self._expired(timeout if expiry is None else expiry)

    def _evict(self) -> None:
        """Ends this (unbacked) session: a backed client took its cache (``MemoryCache``). A wait for the next
        request wakes now; a step being computed finishes first."""
        self.evicted = True
        readable = self.requests.readable()
        if not readable.done():
            readable.set_exception(RequestTimeout())
            self._wake = readable

    def _evicted(self) -> NodeRPCError:
        if self._wake is not None and self._wake.done():
            self._wake.exception()  # taken, so asyncio does not log it as never retrieved
        return NodeRPCError(
            ErrorCode.CACHE_FULL,
            "node busy: this session's cache went to a client that pays with escrow (or that the node trusts); "
            "sessions on the free allowance give way; reserve escrow for this node, or route through another",
        )

    @staticmethod
    def _expired(timeout: float) -> NodeRPCError:
        return NodeRPCError(
            ErrorCode.SESSION_EXPIRED,
            f"no step for {timeout:.0f}s, the session's cache was freed; open a new session and replay",
        )

    async def _next_or_quiet(self):
        """The next request, or ``_QUIET`` once the stream has been quiet for ``receipt_delay`` s while the compute
        thread is not gathering other sessions' steps (signing then would hold up their requests), or for at most
        five times that in any case."""
        delay = self.config.receipt_delay
        for _ in range(5):
            try:
                return await self.requests.next(delay if delay > 0 else None)
            except RequestTimeout:
                if not self.steps.compute.gathering:
                    return _QUIET
        return _QUIET

    def _close(self) -> None:
        self.state = State.CLOSED
        self.steps.session_ended(self.vouchers)  # its client's last voucher still counts
        self.node.active_sessions -= 1
        if self.slot is not None:
            self.node.inbox.close(self.open.session_id, self.slot)
        if self.link is not None:
            self.link.close()
        if self.caches:  # the compute thread's rounds know a session by its first cache (``InferenceTask.session``)
            self.steps.compute.forget(id(self.caches[0]))
        if isinstance(self.receipt, asyncio.Future):  # the stream ended while it was signed: nobody takes it
            if self.receipt.done():
                if not self.receipt.cancelled():
                    self.receipt.exception()  # retrieved, so asyncio does not log it
            else:
                self.receipt.cancel()
        self.caches = self.work = self._push_output = self.receipt = None
