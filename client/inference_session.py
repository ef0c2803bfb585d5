"""Inference through a chain of nodes with server-side KV caches, surviving node failures mid-generation.

Each hop keeps the inputs it was sent, step by step. When a hop fails (a dead node, a timeout, an error, a bad
output or a dishonest receipt), the client bans the peer, routes the same blocks through other nodes and replays
that history to them in the original steps. Replaying the same chunks makes the replacement's KV cache identical to
the lost one, so greedy generation continues token for token as if nothing happened (Petals issue #587).

With ``ClientConfig.push``, a step is sent to every hop at once and each hop pushes its output straight to the next
one (``nectar.node.push``); the client still gets every hop's output and receipt, so history, checks and failover
stay as they are. A push that does not come makes the client relay that step, as without push.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from nectar.client.config import ClientConfig
from nectar.client.payments import ReceiptError, Wallet
from nectar.client.routing import RemoteSequenceManager, RemoteSpan
from nectar.wire.dht import ClientRuntime
from nectar.wire.protocol import RPC_INFERENCE, ErrorCode, NodeRPCError, make_request, module_uid, unpack_metadata
from nectar.wire.protocol import unpack_tensors
from nectar.client.streams import open_stream

logger = logging.getLogger(__name__)


class HopFailed(Exception):
    def __init__(self, span: RemoteSpan, reason: str):
        super().__init__(f"{span}: {reason}")
        self.span, self.reason = span, reason
        self.index, self.inputs = None, None  # set by InferenceSession._run_hops
        self.burned = False  # a later hop may have computed this step from a push: retry under a new step number


class _HopStream:
    """One open inference stream to one node (lives on the runtime's loop)."""

    def __init__(self, runtime: ClientRuntime, span: RemoteSpan, model_id: str, *, direct: bool = True):
        self.runtime, self.span, self.model_id, self.direct = runtime, span, model_id, direct
        self.uid = module_uid(model_id, span.start, span.end)
        self.queue: Optional[asyncio.Queue] = None
        self.responses = None

    async def open(self, metadata: dict, timeout: float) -> dict:
        self.queue = asyncio.Queue()

        async def requests():
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                yield item

        self.responses = (await asyncio.wait_for(
            open_stream(self.runtime.p2p, self.span.peer_id, self.span.info, RPC_INFERENCE, requests(),
                        direct=self.direct), timeout)).__aiter__()
        self.queue.put_nowait(make_request(self.uid, [], metadata))
        response = await asyncio.wait_for(self.responses.__anext__(), timeout)
        return unpack_metadata(response.metadata)

    async def step(self, tensors: list[torch.Tensor], metadata: dict, timeout: float):
        self.send(tensors, metadata)
        return await asyncio.wait_for(self.receive(), timeout)

    def send(self, tensors: list[torch.Tensor], metadata: dict) -> None:
        self.queue.put_nowait(make_request(self.uid, tensors, metadata))

    async def receive(self):
        response = await self.responses.__anext__()
        return unpack_tensors(response.tensors), unpack_metadata(response.metadata)

    def send_nowait(self, metadata: dict) -> None:
        if self.queue is not None:
            self.queue.put_nowait(make_request(self.uid, [], metadata))

    def close(self) -> None:
        if self.queue is not None:
            self.queue.put_nowait(None)


@dataclass
class _Hop:
    span: RemoteSpan
    stream: _HopStream
    history: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (step, position, inputs)
    unchecked: list[tuple[dict, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (reply, in, out)
    voucher: Optional[dict] = None  # signed after the last receipt check, sent with the next step
    fault: Optional[str] = None  # a receipt that failed its check after the step had returned
    push_token: bytes = field(default_factory=lambda: os.urandom(16))  # the previous hop shows it to push here
    pending: Optional[asyncio.Task] = None  # the answer to a step sent ahead (push mode)
    receipt: Optional[asyncio.Task] = None  # the last step's receipt, which the node sends after its output


class InferenceSession:
    """A generation session over the whole model's blocks; ``step(hidden)`` returns the last block's output.

    :param max_length: total tokens (prompt + generated, prefix included) the session may hold
    """

    def __init__(self, manager: RemoteSequenceManager, runtime: ClientRuntime, wallet: Wallet, *, max_length: int,
                 batch_size: int = 1, config: ClientConfig):
        self.manager, self.runtime, self.wallet, self.config = manager, runtime, wallet, config
        self.max_length, self.batch_size = max_length, batch_size
        self.session_id = os.urandom(16)
        self.position = 0
        self.step_index = 0
        self.prompts: Optional[torch.Tensor] = None
        self.hops: list[_Hop] = []
        self.failovers = 0
        self.pushed_steps, self.push_fallbacks = 0, 0  # steps served by push / relayed after a missing push
        self._push_misses = 0  # consecutive fallbacks: pushes that never come (a firewall) cost push_timeout each
        self._closed = False
        self.hops = self._open_route(0, manager.num_blocks)

    # ---- hops -------------------------------------------------------------------------------------------------

    def _open_route(self, start: int, end: int) -> list[_Hop]:
        errors = []
        for attempt in range(self.config.max_retries + 1):
            route = self.manager.make_inference_route(start, end, cache_tokens=self.max_length * self.batch_size)
            hops = []
            try:
                for span in route:
                    hops.append(self._open_hop(span))
                self.wallet.pair([span.info.eth_address for span in route])
                return hops
            except HopFailed as e:
                errors.append(str(e))
                self.manager.ban(e.span.peer_id, e.reason)
                for hop in hops:
                    hop.stream.close()
        raise RuntimeError(f"Could not open an inference route for blocks {start}:{end}: {'; '.join(errors[-3:])}")

    def _open_hop(self, span: RemoteSpan) -> _Hop:
        stream = _HopStream(self.runtime, span, self.manager.model_id, direct=self.config.direct)
        hop = _Hop(span, stream)
        metadata = {"type": "open", "session_id": self.session_id, "max_length": self.max_length,
                    "batch_size": self.batch_size, "client": self.wallet.address, "receipts": "separate"}
        if self.config.push:
            metadata["push_token"] = hop.push_token
        try:
            self.runtime.run(stream.open(metadata, self.config.connect_timeout), timeout=self.config.connect_timeout + 5)
        except Exception as e:
            stream.close()
            raise HopFailed(span, f"could not open a session: {_describe(e)}")
        return hop

    async def _hop_step(self, hop: _Hop, inputs: torch.Tensor, *, step: int, position: int) -> torch.Tensor:
        """One step at one hop, on the runtime's loop. The output's shape and values are checked here; its receipt
        is checked after the whole step returned (``_check_receipts``), off the token's critical path."""
        span = hop.span
        if hop.fault is not None:
            raise HopFailed(span, hop.fault)
        tensors = [inputs]
        if position == 0 and self.prompts is not None:
            tensors.append(self.prompts[span.start : span.end])
        try:
            hop.stream.send(tensors, self._step_metadata(hop, step, position))
            outputs, reply = await asyncio.wait_for(self._receive_answer(hop), self.config.step_timeout)
        except Exception as e:
            raise HopFailed(span, _describe(e))
        return self._accept(hop, inputs, outputs, reply, step=step, position=position)

    def _step_metadata(self, hop: _Hop, step: int, position: int) -> dict:
        metadata = {"type": "step", "session_id": self.session_id, "step": step, "position": position}
        voucher, hop.voucher = hop.voucher, None
        if voucher is None and not hop.unchecked:
            voucher = self.wallet.voucher_for(hop.span.info.eth_address)
        if voucher is not None:
            metadata["voucher"] = voucher
        return metadata

    def _accept(self, hop: _Hop, inputs: torch.Tensor, outputs: list[torch.Tensor], reply: dict, *, step: int,
                position: int) -> torch.Tensor:
        """Checks a hop's output and keeps its input for replay and its receipt for ``_check_receipts``."""
        span = hop.span
        if len(outputs) != 1 or outputs[0].shape != inputs.shape or not torch.isfinite(outputs[0]).all():
            raise HopFailed(span, f"returned a malformed output {[list(o.shape) for o in outputs]}")
        follows = reply.get("receipt_follows") is True
        if "receipt" not in reply and not follows and self.config.verify_receipts:
            raise HopFailed(span, "answered without a receipt")
        hop.history.append((step, position, inputs))
        if "receipt" in reply:
            hop.unchecked.append((reply["receipt"], inputs, outputs[0]))
        elif follows:  # read while the caller computes the next token; checked as soon as it comes
            hop.receipt = asyncio.ensure_future(self._receive_receipt(hop, step, inputs, outputs[0]))
        return outputs[0]

    async def _receive_receipt(self, hop: _Hop, step: int, inputs: torch.Tensor, output: torch.Tensor) -> None:
        try:
            _, message = await asyncio.wait_for(hop.stream.receive(), self.config.step_timeout)
        except Exception as e:
            hop.fault = hop.fault or f"sent no receipt for step {step}: {_describe(e)}"
            return
        if message.get("type") != "receipt" or message.get("step") != step or "receipt" not in message:
            if self.config.verify_receipts:
                hop.fault = hop.fault or f"sent {message.get('type')!r} where the receipt of step {step} was due"
            return
        hop.unchecked.append((message["receipt"], inputs, output))
        self._check_receipts([hop])

    def _flush(self, hop: _Hop) -> None:
        """Asks a hop for the receipt of its last step now (a node otherwise signs it while the next step computes,
        or once the stream has been quiet for a moment)."""
        hop.stream.send_nowait({"type": "flush", "session_id": self.session_id})

    async def _take_receipt(self, hop: _Hop) -> None:
        """Waits for the receipt of the hop's last step (the node signs it while the next step computes, or once the
        stream is quiet)."""
        if hop.receipt is not None:
            receipt, hop.receipt = hop.receipt, None
            await receipt

    async def _receive_answer(self, hop: _Hop):
        """The answer to the request just sent, which comes after the receipt of the hop's previous step. (The
        request leaves first: writing to a node that died fails at once, where a read may wait for a timeout.)"""
        await self._take_receipt(hop)
        return await hop.stream.receive()

    def _check_receipts(self, hops: list[_Hop]) -> None:
        """Checks the receipts of the steps just returned and signs each node's next voucher (on the loop, while
        the caller computes the next token). A bad receipt makes that hop's next step fail over."""
        for hop in hops:
            span, pending, hop.unchecked = hop.span, hop.unchecked, []
            for receipt, inputs, output in pending:
                try:
                    self.wallet.check_receipt(
                        receipt, node_address=span.info.eth_address, price_per_block=span.info.price_per_token,
                        start=span.start, end=span.end, inputs=inputs, outputs=output, session_id=self.session_id,
                        verify=self.config.verify_receipts,
                    )
                except ReceiptError as e:
                    hop.fault = hop.fault or f"dishonest receipt: {e}"
                except Exception as e:  # never let a check crash the loop: treat the hop as faulty
                    logger.warning(f"Checking a receipt from {span} failed", exc_info=True)
                    hop.fault = hop.fault or f"unreadable receipt: {e}"
            if pending and hop.fault is None:
                hop.voucher = self.wallet.voucher_for(span.info.eth_address)
                self.manager.mark_ok(span.peer_id)

    async def _run_hops(self, x: torch.Tensor, index: int, *, step: int, position: int):
        """Runs hops ``index..`` in one coroutine (no thread switch between hops); on failure raises HopFailed
        carrying the failed hop's index and input."""
        while index < len(self.hops):
            try:
                x = await self._hop_step(self.hops[index], x, step=step, position=position)
            except HopFailed as e:
                e.index, e.inputs = index, x
                raise
            index += 1
        return x

    def _can_push(self, position: int) -> bool:
        """Push needs a direct lane at every hop that receives one, and no deep prompts to hand out (they travel
        with the first step's tensors)."""
        return (self.config.push and self._push_misses < self.config.push_misses and len(self.hops) > 1
                and all(hop.span.info.direct_address for hop in self.hops[1:])
                and not (position == 0 and self.prompts is not None) and all(hop.fault is None for hop in self.hops))

    async def _push_hops(self, x: torch.Tensor, *, step: int, position: int) -> torch.Tensor:
        """Sends the step to every hop at once: the first gets ``x``, each later one its input pushed by the hop
        before it. Answers are taken in route order, so each hop's input (the previous output) is known when its
        output and receipt are checked. From a hop whose push did not come, the step is relayed as without push."""
        hops = self.hops
        for i, hop in enumerate(hops):
            metadata = self._step_metadata(hop, step, position)
            if i + 1 < len(hops):
                metadata["push_to"] = {"address": hops[i + 1].span.info.direct_address, "token": hops[i + 1].push_token}
            if i > 0:
                metadata["pushed"] = True
            hop.stream.send([x] if i == 0 else [], metadata)
            hop.pending = asyncio.ensure_future(self._receive_answer(hop))
            if i == 0:
                await asyncio.sleep(0)  # the first hop's request leaves before the others are serialized
        for i, hop in enumerate(hops):
            try:
                if i > 0:
                    await self._await_push(hop, step)
                outputs, reply = await asyncio.wait_for(hop.pending, self.config.step_timeout)
                hop.pending = None
                if reply.get("push_missing"):
                    await self._cancel_pushes(hops[i + 1 :], step)  # nothing came to them either: hop i never ran
                    self.push_fallbacks += 1
                    self._push_misses += 1
                    logger.debug(f"No push reached {hop.span} at step {step}; relaying from there")
                    return await self._run_hops(x, i, step=step, position=position)
                x_next = self._accept(hop, x, outputs, reply, step=step, position=position)
            except Exception as e:
                hop.pending = None
                failure = e if isinstance(e, HopFailed) else HopFailed(hop.span, _describe(e))
                failure.index, failure.inputs = i, x
                failure.burned = await self._cancel_pushes(hops[i + 1 :], step)
                raise failure
            x = x_next
        self.pushed_steps += 1
        self._push_misses = 0
        return x

    async def _await_push(self, hop: _Hop, step: int) -> None:
        """Gives the push ``push_timeout`` (counted from the previous hop's answer), then cancels it: a hop that
        got its push meanwhile answers anyway, one still waiting answers ``push_missing``."""
        done, _ = await asyncio.wait({hop.pending}, timeout=self.config.push_timeout)
        if not done:
            self._cancel(hop, step)

    def _cancel(self, hop: _Hop, step: int) -> None:
        """Tells a hop waiting for this step's push to stop waiting (it answers ``push_missing`` unless it ran)."""
        hop.stream.send([], {"type": "cancel", "session_id": self.session_id, "step": step})

    async def _cancel_pushes(self, hops: list[_Hop], step: int) -> bool:
        """Cancels steps still waiting for a push and drains their answers; True if any hop computed the step
        anyway (its receipt for this step number exists, so a retry must not reuse the number)."""
        computed = False
        for hop in hops:
            if hop.pending is not None and not hop.pending.done():
                self._cancel(hop, step)
        for hop in hops:
            if hop.pending is None:
                continue
            try:
                outputs, reply = await asyncio.wait_for(hop.pending, self.config.step_timeout)
                computed = computed or bool(outputs)
                if reply.get("receipt_follows") is True:  # a step computed anyway: its receipt is not used
                    self._flush(hop)
                    await asyncio.wait_for(hop.stream.receive(), self.config.step_timeout)
            except Exception as e:  # its stream is gone: the next step fails over from it
                hop.fault = hop.fault or f"failed while its push was cancelled: {_describe(e)}"
            hop.pending = None
        return computed

    def _run_hop(self, hop: _Hop, inputs: torch.Tensor, *, step: int, position: int, last: bool) -> torch.Tensor:
        """One hop of a replay (failover). Each answer comes after the hop's previous receipt, which is checked as
        it comes; the ``last`` step also waits for its own (a node signs it while the next step computes, or once
        the stream goes quiet)."""

        async def step_with_receipt() -> torch.Tensor:
            output = await self._hop_step(hop, inputs, step=step, position=position)
            if last:
                if hop.receipt is not None:
                    self._flush(hop)
                await self._take_receipt(hop)
                self._check_receipts([hop])
            return output

        output = self.runtime.run(step_with_receipt(), timeout=2 * self.config.step_timeout + 5)
        if hop.fault is not None:
            raise HopFailed(hop.span, hop.fault)
        return output

    def _replace(self, index: int) -> None:
        """Routes hop ``index``'s blocks through other nodes and replays its history to them."""
        old = self.hops[index]
        old.stream.close()
        self.failovers += 1
        for attempt in range(self.config.max_retries + 1):
            new_hops = self._open_route(old.span.start, old.span.end)
            try:
                for i, (step, position, inputs) in enumerate(old.history):
                    x = inputs
                    for hop in new_hops:
                        x = self._run_hop(hop, x, step=step, position=position, last=i == len(old.history) - 1)
                self.hops[index : index + 1] = new_hops
                logger.info(f"Failover: blocks {old.span.start}:{old.span.end} moved from {old.span} to {new_hops}, "
                            f"replayed {len(old.history)} steps")
                return
            except HopFailed as e:
                self.manager.ban(e.span.peer_id, e.reason)
                for hop in new_hops:
                    hop.stream.close()
        raise RuntimeError(f"Could not replace the route for blocks {old.span.start}:{old.span.end}")

    # ---- public API -------------------------------------------------------------------------------------------

    def step(self, hidden_states: torch.Tensor, prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sends [B, T, H] new positions through every block; returns the output hidden states [B, T, H]."""
        if self._closed:
            raise RuntimeError("This inference session is closed; open a new one")
        if hidden_states.ndim != 3 or hidden_states.shape[0] != self.batch_size:
            raise ValueError(f"hidden_states must be [batch={self.batch_size}, tokens, hidden], "
                             f"got {list(hidden_states.shape)}")
        if self.position + hidden_states.shape[1] > self.max_length:
            raise ValueError(f"Session max_length {self.max_length} exceeded: at {self.position}, adding "
                             f"{hidden_states.shape[1]}. Open the session with a larger max_length.")
        if prompts is not None:
            if self.position != 0:
                raise ValueError("prompts can only be sent with the first step")
            self.prompts = prompts.detach().float()
        step, position = self.step_index, self.position
        x = hidden_states.detach().float().cpu()
        index, failures = 0, 0
        while True:
            try:
                if index == 0 and self._can_push(position):
                    run = self._push_hops(x, step=step, position=position)
                else:
                    run = self._run_hops(x, index, step=step, position=position)
                x = self.runtime.run(run, timeout=len(self.hops) * (self.config.step_timeout
                                                                    + self.config.push_timeout + 5))
                break
            except HopFailed as e:
                failures += 1
                self.manager.ban(e.span.peer_id, e.reason)
                if failures > self.config.max_retries:
                    raise RuntimeError(f"Inference failed after {failures} attempts; last error: {e}")
                if e.burned:  # a receipt for (session, step) may exist at a later hop: never sign the number twice
                    self.step_index += 1
                    step = self.step_index
                index, x = e.index, e.inputs
                self._replace(index)
                # x is the input of hop `index`, whose replacement now holds the history: retry it
        self.position += hidden_states.shape[1]
        self.step_index += 1
        self.runtime.loop.call_soon_threadsafe(self._check_receipts, list(self.hops))
        return x

    @property
    def route(self) -> list[RemoteSpan]:
        return [hop.span for hop in self.hops]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:  # the last step's receipts: the closing vouchers pay for them
            self.runtime.run(self._check_all(), timeout=30)
        except Exception:
            logger.debug("Could not check the last receipts", exc_info=True)
        for hop in self.hops:
            voucher = self.wallet.voucher_for(hop.span.info.eth_address)
            try:
                if voucher is not None:  # settle the last step before leaving
                    self.runtime.loop.call_soon_threadsafe(
                        hop.stream.send_nowait, {"type": "pay", "session_id": self.session_id, "voucher": voucher})
                self.runtime.loop.call_soon_threadsafe(hop.stream.close)
            except RuntimeError:
                pass

    async def _check_all(self) -> None:
        waiting = [hop for hop in self.hops if hop.receipt is not None]
        for hop in waiting:
            self._flush(hop)
        receipts = [hop.receipt for hop in waiting]
        if receipts:  # flushed just now; a node that died must not hold up the close
            await asyncio.wait(receipts, timeout=min(5.0, self.config.step_timeout))
        self._check_receipts(self.hops)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _describe(error: BaseException) -> str:
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    text = str(error) or type(error).__name__
    code = NodeRPCError.code_of(error)
    return f"{code.value}: {text.split(code.value + ':', 1)[1].strip()}" if code else text
