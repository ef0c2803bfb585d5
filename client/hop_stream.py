"""One hop of an inference session: the open stream to its node, and what the session keeps about the hop.

``HopStream`` is the only client module that sends inference requests and reads their replies, as the typed
messages of ``nectar.wire.messages``.
``Hop`` is the session's record of one hop: its state, the inputs it was sent (for replay) and its receipts.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from nectar.client.routing import RemoteSpan
from nectar.wire.messages import (
    Cancel,
    Flush,
    InferenceReply,
    Open,
    Opened,
    Pay,
    PushMissing,
    PushTarget,
    ReceiptMessage,
    Step,
    StepReply,
    decode_inference_reply,
)
from nectar.wire.protocol import RPC_INFERENCE, ErrorCode, NodeRPCError, module_uid, peer_text
from nectar.wire.receipts import SESSION_NONCE_BYTES, bind_session
from nectar.wire.stubs import open_stream

Connect = (
    Callable[
        [RemoteSpan, AsyncIterator[runtime_pb2.ExpertRequest]], Awaitable[AsyncIterator[runtime_pb2.ExpertResponse]]
    ]
    | None
)


class StreamState(enum.Enum):
    NEW = "new"  # nothing sent yet
    OPEN = "open"  # the stream's request iterator is live: requests may be queued
    CLOSED = "closed"  # the request iterator has ended (the node then ends the stream)


class Reply:
    """A message the node sent on the stream (``nectar.wire.messages``): a step's answer (``StepReply``), a receipt
    of its own (``ReceiptMessage``), an open's ack (``Opened``) or ``PushMissing``."""

    __slots__ = ("message",)

    def __init__(self, message: InferenceReply):
        self.message = message

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [self.message.output] if isinstance(self.message, StepReply) else []

    @property
    def receipt(self) -> dict | None:
        return getattr(self.message, "receipt", None)

    @property
    def descriptor(self) -> bytes | None:
        """The compute descriptor that came with the receipt (the wire's ``fingerprint``; the client checks it and
        forwards it to the ledger, countersigned)."""
        return getattr(self.message, "fingerprint", None)

    @property
    def receipt_follows(self) -> bool:
        """The receipt of this step comes as a message of its own, before the answer to the next request."""
        return isinstance(self.message, StepReply) and self.message.receipt_follows

    @property
    def push_missing(self) -> bool:
        """A pushed step that the client cancelled before its push came: the node did not compute it."""
        return isinstance(self.message, PushMissing)

    def receipt_for(self, step: int) -> ReceiptMessage | None:
        """The receipt of ``step`` this message is or carries (a step answer's riding receipt), if it is one."""
        message = self.message
        if isinstance(message, StepReply):
            message = message.previous
        if isinstance(message, ReceiptMessage) and message.step == step and message.receipt is not None:
            return message
        return None

    @property
    def is_answer(self) -> bool:
        """An answer to a step (its output or ``PushMissing``), not a receipt alone."""
        return not isinstance(self.message, ReceiptMessage)

    def describe(self) -> str:
        return type(self.message).__name__


class HopStream:
    """One inference stream to one node, for one session (lives on the runtime's loop). Requests are queued and
    leave in order; replies are read in order with ``receive``."""

    def __init__(
        self,
        runtime,
        span: RemoteSpan,
        model_id: str,
        *,
        direct: bool = True,
        connect: Connect = None,
        adapter: str | None = None,
        receipts_ride: bool = True,
    ):
        """:param connect: opens the stream given the requests (default: the node's direct lane or P2P, through
        ``runtime``; tests connect in-memory nodes)
        :param adapter: the LoRA adapter the node computes this session with (``Open.adapter``)
        :param receipts_ride: whether the node may send a receipt in the next step's answer (``Open.receipts_ride``)"""
        self.runtime, self.span, self.model_id, self.direct = runtime, span, model_id, direct
        self.adapter, self.receipts_ride = adapter, receipts_ride
        self.connect = connect or self._connect
        self.uid = module_uid(model_id, span.start, span.end)
        self.state = StreamState.NEW
        self.session_id: bytes | None = None
        self.queue: asyncio.Queue | None = None
        self.responses = None

    async def open(
        self,
        *,
        session_id: bytes,
        max_length: int,
        batch_size: int,
        client: str,
        push_token: bytes | None,
        timeout: float,
        private_key: str | None = None,
    ) -> Opened:
        """Opens the stream and the node's session (its KV cache); returns the node's ack. ``private_key``: the
        paying key the open is signed with (nodes bill only the signer and refuse unsigned opens)."""
        opening = Open(
            self.uid,
            session_id,
            max_length,
            batch_size,
            client,
            separate_receipts=True,
            receipts_ride=self.receipts_ride,
            push_token=push_token,
            adapter=self.adapter,
        )
        if private_key is not None:
            opening = opening.signed(private_key, node=self.span.info.eth_address, peer_id=str(self.span.peer_id))
        self.session_id, self.queue, self.state = session_id, asyncio.Queue(), StreamState.OPEN

        async def requests():
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                yield item

        self.responses = (await asyncio.wait_for(self.connect(self.span, requests()), timeout)).__aiter__()
        self.queue.put_nowait(opening.to_request())
        reply = decode_inference_reply(await asyncio.wait_for(self.responses.__anext__(), timeout))
        if not isinstance(reply, Opened):
            raise ValueError(f"{self.span} answered an open with {type(reply).__name__}, not Opened")
        return reply

    async def _connect(
        self, span: RemoteSpan, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return await open_stream(self.runtime.p2p, span.peer_id, span.info, RPC_INFERENCE, requests, direct=self.direct)

    def send_step(
        self,
        tensors: list[torch.Tensor],
        *,
        step: int,
        position: int,
        voucher: dict | None = None,
        push_to: tuple[str, bytes] | None = None,
        pushed: bool = False,
    ) -> None:
        """Queues one step: ``tensors`` are its inputs (none when ``pushed``: the previous hop pushes them);
        ``push_to`` is (next hop's direct address, its push token) where this hop pushes its output."""
        hidden, prompts = (tensors + [None, None])[:2]
        self._send(
            Step(
                self.session_id,
                step,
                position,
                hidden,
                prompts,
                voucher,
                PushTarget(*push_to) if push_to is not None else None,
                pushed,
            )
        )

    async def step(self, tensors: list[torch.Tensor], *, step: int, position: int, timeout: float, **options) -> Reply:
        """Sends one step and waits for its answer (options as ``send_step``)."""
        self.send_step(tensors, step=step, position=position, **options)
        async with asyncio.timeout(timeout):  # not wait_for: on Python 3.11 that costs a task a step
            return await self.receive()

    def cancel(self, step: int) -> None:
        """Tells the node to stop waiting for this step's push (it answers ``push_missing`` unless it ran)."""
        self._send(Cancel(self.session_id, step))

    def flush(self) -> None:
        """Asks for the receipt of the last step now (a node otherwise signs it while the next step computes, or
        once the stream has been quiet for a moment)."""
        self._send_if_open(Flush(self.session_id))

    def pay(self, voucher: dict) -> None:
        """Settles what the session owes before it leaves."""
        self._send_if_open(Pay(self.session_id, voucher))

    async def receive(self) -> Reply:
        return Reply(decode_inference_reply(await self.responses.__anext__()))

    def close(self) -> None:
        if self.state is StreamState.OPEN:
            self.queue.put_nowait(None)
        self.state = StreamState.CLOSED

    def _send(self, message: Step | Cancel | Flush | Pay) -> None:
        if self.state is not StreamState.OPEN:
            raise ConnectionError(f"the stream to {self.span} is {self.state.value}")
        self.queue.put_nowait(message.to_request(self.uid))

    def _send_if_open(self, message: Flush | Pay) -> None:
        if self.state is StreamState.OPEN:
            self.queue.put_nowait(message.to_request(self.uid))


# ---- the session's record of a hop -----------------------------------------------------------------------------


MAX_REASON = 1000  # characters of a fault's reason kept (an honest node's longest error is about 520)


class HopState(enum.Enum):
    OPEN = "open"  # steps go through it
    FAILED = "failed"  # it misbehaved (dead, an error, a bad output or receipt): its next step fails over
    CLOSED = "closed"  # replaced after a failure, or the session closed


@dataclass(frozen=True)
class Fault:
    """Why a hop failed: the ban's reason, and what the session reports if no other node does better."""

    reason: str
    code: ErrorCode | None = None  # the node answered with this error
    receipt: bool = False  # the node's receipt failed the client's checks (or never came)

    def __post_init__(self):  # a node writes its errors' text: cut before it reaches logs, bans and users' errors
        object.__setattr__(self, "reason", peer_text(self.reason, MAX_REASON))

    @classmethod
    def of(cls, error: BaseException, prefix: str = "") -> Fault:
        timed_out = isinstance(error, (asyncio.TimeoutError, TimeoutError))
        return cls(prefix + describe(error), code=None if timed_out else NodeRPCError.code_of(error))


class HopFailed(Exception):
    """One hop could not do its part of a step; the session bans its node and fails over."""

    def __init__(self, span: RemoteSpan, fault: Fault | str):
        fault = fault if isinstance(fault, Fault) else Fault(fault)
        super().__init__(f"{span}: {fault.reason}")
        self.span, self.fault = span, fault
        self.index: int | None = None  # which hop of the route, and the input it was given (set by the session)
        self.inputs: torch.Tensor | None = None
        self.burned = False  # a later hop may have computed this step from a push: retry under a new step number

    @property
    def reason(self) -> str:
        return self.fault.reason


@dataclass
class Hop:
    span: RemoteSpan
    stream: HopStream
    state: HopState = HopState.OPEN
    fault: Fault | None = None  # set with FAILED: the first thing that went wrong
    history: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (step, position, inputs)
    unchecked: list[tuple] = field(default_factory=list)  # (receipt, step, compute descriptor, in, out)
    voucher: dict | None = None  # signed after the last receipt check, sent with the next step
    push_token: bytes = field(default_factory=lambda: os.urandom(16))  # the previous hop shows it to push here
    receipt_session: bytes = b""  # the session id its receipts carry: bound to the node's nonce (``bound_session``)
    pending: asyncio.Task | None = None  # the answer to a step sent ahead (push mode)
    receipt: asyncio.Task | None = None  # the last step's receipt, which the node sends after its output

    def __repr__(self) -> str:  # the dataclass's would print every replayed input tensor into a log line
        return f"Hop({self.span}, {self.state.value})"

    def fail(self, fault: Fault) -> None:
        """OPEN -> FAILED. The first fault is kept (a closed hop records one too: it must not be paid or marked ok)."""
        if self.fault is None:
            self.fault = fault
        if self.state is HopState.OPEN:
            self.state = HopState.FAILED

    def check(self) -> None:
        """Raises HopFailed unless the hop can take a step."""
        if self.state is not HopState.OPEN:
            raise HopFailed(self.span, self.fault or Fault(f"the hop is {self.state.value}"))

    def close(self) -> None:
        self.state = HopState.CLOSED
        self.stream.close()


def bound_session(session_id: bytes, opened: Opened) -> bytes:
    """The session id a node's receipts must carry after it answered the open with ``opened``: the client's id
    bound to the node's nonce, or (a node that sends none, from before nonces) the client's id itself."""
    nonce = opened.session_nonce
    if nonce is None:
        return session_id.rjust(32, b"\0")
    if not isinstance(nonce, bytes) or len(nonce) != SESSION_NONCE_BYTES:
        raise ValueError(f"the node answered the open with a malformed session_nonce {nonce!r:.80}")
    return bind_session(session_id, nonce)


def describe(error: BaseException) -> str:
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    text = str(error) or type(error).__name__
    code = NodeRPCError.code_of(error)
    return f"{code.value}: {text.split(code.value + ':', 1)[1].strip()}" if code else text
