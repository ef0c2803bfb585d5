"""Inference through a chain of nodes with server-side KV caches, surviving node failures mid-generation.

Each hop keeps the inputs it was sent, step by step. When a hop fails (a dead node, a timeout, an error, a bad
output or a dishonest receipt), the client bans the peer, routes the same blocks through other nodes and replays
that history to them in the original steps. Replaying the same chunks makes the replacement's KV cache identical to
the lost one, so greedy generation continues token for token as if nothing happened (Petals issue #587).

States: the session is OPEN until ``close()`` (then CLOSED: steps raise ``SessionClosedError``); each hop is OPEN,
FAILED once it misbehaved (its next step fails over) or CLOSED once replaced (``nectar.client.hop_stream``). A step
runs hop by hop (relay) or, with ``ClientConfig.push``, at every hop at once (``nectar.client.push_mode``); either
way a failed hop is replaced and the step retried from it, up to ``max_retries`` times, after which the step raises
the named error of its last failure (``nectar.client.errors``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from nectar.client.config import ClientConfig
from nectar.client.errors import (
    InferenceFailedError,
    NectarClientError,
    NodeBusyError,
    PaymentRequiredError,
    ReceiptRejectedError,
    RouteUnavailableError,
    SessionClosedError,
)
from nectar.client.hop_stream import Fault, Hop, HopFailed, HopStream, Reply, bound_session
from nectar.client.payments import ReceiptError, Wallet
from nectar.client.pricing import BudgetExceededError, CostMeter, RouteTooExpensiveError, route_price
from nectar.client.push_mode import PushMode
from nectar.client.routing import MissingBlocksError, RemoteSequenceManager, RemoteSpan
from nectar.wire.dht import ClientRuntime
from nectar.wire.event_loop import run_on_loop
from nectar.wire.protocol import ErrorCode
from nectar.wire.receipts import ReceiptKind, model_id_hash

logger = logging.getLogger(__name__)


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class InferenceSession:
    """A generation session over the whole model's blocks; ``step(hidden)`` returns the last block's output.

    :param max_length: total tokens (prompt + generated, prefix included) the session may hold
    :param streams: opens the stream of one hop (default: a ``HopStream`` through ``runtime``; tests pass others)
    :param meter: counts what this session's accepted receipts cost and keeps it within the meter's budget and price
        cap (``nectar.client.pricing``); several sessions may share one (default: a meter of its own, no budget)
    """

    def __init__(
        self,
        manager: RemoteSequenceManager,
        runtime: ClientRuntime,
        wallet: Wallet,
        *,
        max_length: int,
        batch_size: int = 1,
        config: ClientConfig,
        streams: Callable[[RemoteSpan], HopStream] | None = None,
        meter: CostMeter | None = None,
    ):
        self.manager, self.runtime, self.wallet, self.config = manager, runtime, wallet, config
        self.max_length, self.batch_size = max_length, batch_size
        self._streams = streams or (
            lambda span: HopStream(
                runtime,
                span,
                manager.model_id,
                direct=config.direct,
                adapter=manager.active_adapter,
                receipts_ride=config.receipts_ride,
            )
        )
        self.session_id = os.urandom(16)
        self.model_hash = model_id_hash(manager.model_id)  # the model its receipts must name
        self.state = SessionState.OPEN
        self.position = 0
        self.step_index = 0
        self.prompts: torch.Tensor | None = None
        self.hops: list[Hop] = []
        self.failovers = 0
        self.push_mode = PushMode(self)
        self.meter = meter if meter is not None else CostMeter()
        self.max_price = self.meter.price_cap(batch_size * max_length)  # per token through every block
        self.hops = self._open_route(0, manager.num_blocks)
        self.meter.opened()  # closed by close(): a settlement waits for the receipts of every open session

    @property
    def pushed_steps(self) -> int:
        """Steps served by push at every hop."""
        return self.push_mode.pushed_steps

    @property
    def push_fallbacks(self) -> int:
        """Steps relayed after a missing push."""
        return self.push_mode.fallbacks

    # ---- hops -------------------------------------------------------------------------------------------------

    def _open_route(self, start: int, end: int) -> list[Hop]:
        # nodes that refused for a reason of the moment or of this client (full cache, no credit) are skipped, not
        # banned: they are online and honest, and the session says why they refused
        errors, skipped = [], {}
        max_price = None
        if self.max_price is not None:  # what the rest of the route leaves of the session's price cap
            kept = [hop.span for hop in self.hops if not (start <= hop.span.start and hop.span.end <= end)]
            max_price = max(self.max_price - route_price(kept), 0)
        for attempt in range(self.config.max_retries + 1):
            try:
                route = self.manager.make_inference_route(
                    start,
                    end,
                    cache_tokens=self.max_length * self.batch_size,
                    exclude=tuple(skipped),
                    max_price=max_price,
                )
                if max_price is not None and route_price(route) > max_price:  # the manager's word is not enough
                    raise RouteTooExpensiveError(
                        f"The route {route} costs {route_price(route)} credit wei per token, above the "
                        f"{max_price} this session may pay",
                        price=route_price(route),
                        cap=max_price,
                    )
            except MissingBlocksError as e:
                if skipped:
                    raise self._refused(skipped, errors, start, end) from e
                if isinstance(e, RouteUnavailableError):
                    raise
                raise RouteUnavailableError(str(e), start=start, end=end, blocks=e.blocks) from e
            hops = []
            try:
                for span in route:
                    hops.append(self._open_hop(span))
                self.wallet.pair([span.info.eth_address for span in route])
                return hops
            except HopFailed as e:
                errors.append(str(e))
                if e.fault.code in (ErrorCode.CACHE_FULL, ErrorCode.CREDIT_LIMIT):
                    skipped[e.span.peer_id] = e.fault.code
                else:
                    self.manager.ban(e.span.peer_id, e.reason)
                for hop in hops:
                    hop.close()
        if skipped:
            raise self._refused(skipped, errors, start, end)
        raise RouteUnavailableError(
            f"Could not open an inference route for blocks {start}:{end}: {'; '.join(errors[-3:])}. Every node tried "
            "is banned for a while; retry later, or check `nectar swarm` for what is online.",
            start=start,
            end=end,
        )

    @staticmethod
    def _refused(skipped: dict, errors: list[str], start: int, end: int) -> NectarClientError:
        """Why no route opened when nodes refused rather than failed: unpaid (reserve escrow) or busy (retry)."""
        if ErrorCode.CREDIT_LIMIT in skipped.values():
            return PaymentRequiredError(
                f"Could not open an inference route for blocks {start}:{end}: {'; '.join(errors[-3:])}"
            )
        return NodeBusyError(
            f"The nodes serving blocks {start}:{end} are busy (their KV cache is in use): {'; '.join(errors[-3:])}. "
            "They are online: retry in a few seconds, or with a shorter max_length."
        )

    def _open_hop(self, span: RemoteSpan) -> Hop:
        stream = self._streams(span)
        hop = Hop(span, stream)
        opening = stream.open(
            session_id=self.session_id,
            max_length=self.max_length,
            batch_size=self.batch_size,
            client=self.wallet.address,
            push_token=hop.push_token if self.config.push else None,
            timeout=self.config.connect_timeout,
            private_key=self.wallet.private_key,
        )
        try:
            opened = self.runtime.run(opening, timeout=self.config.connect_timeout + 5)
            hop.receipt_session = bound_session(self.session_id, opened)
        except Exception as e:
            stream.close()
            raise HopFailed(span, Fault.of(e, "could not open a session: "))
        return hop

    async def _hop_step(self, hop: Hop, inputs: torch.Tensor, *, step: int, position: int) -> torch.Tensor:
        """One step at one hop, on the runtime's loop. The output's shape and values are checked here; its receipt
        is checked after the whole step returned (``_check_receipts``), off the token's critical path."""
        hop.check()
        tensors = [inputs]
        if position == 0 and self.prompts is not None:
            tensors.append(self.prompts[hop.span.start : hop.span.end])
        began = time.perf_counter()
        try:
            hop.stream.send_step(tensors, step=step, position=position, voucher=self._take_voucher(hop))
            async with asyncio.timeout(self.config.step_timeout):  # not wait_for: on 3.11 a task a step
                reply = await self._receive_answer(hop)
        except HopFailed:
            raise
        except Exception as e:
            failed = HopFailed(hop.span, Fault.of(e))
            if isinstance(e, TimeoutError):  # the peer cost a whole step timeout: ban it at least that long
                failed.waited = self.config.step_timeout
            raise failed from e
        # what routing may believe of this peer's speed (announced throughput is only a claim)
        self.manager.observe(
            hop.span.peer_id, inputs.shape[0] * inputs.shape[1] * hop.span.length, time.perf_counter() - began
        )
        return self._accept(hop, inputs, reply, step=step, position=position)

    def _take_voucher(self, hop: Hop) -> dict | None:
        """The voucher to send with the hop's next step: the one signed after its last receipt check, or one for
        what is owed if no receipt waits for its check."""
        voucher, hop.voucher = hop.voucher, None
        if voucher is None and not hop.unchecked:
            voucher = self.wallet.voucher_for(hop.span.info.eth_address, credit_limit=hop.span.info.credit_limit)
        return voucher

    def _accept(self, hop: Hop, inputs: torch.Tensor, reply: Reply, *, step: int, position: int) -> torch.Tensor:
        """Checks a hop's output and keeps its input for replay and its receipt for ``_check_receipts``."""
        span, outputs = hop.span, reply.outputs
        if len(outputs) != 1 or outputs[0].shape != inputs.shape or not _all_finite(outputs[0]):
            raise HopFailed(span, f"returned a malformed output {[list(o.shape) for o in outputs]}")
        receipt, follows = reply.receipt, reply.receipt_follows
        if receipt is None and not follows and self.config.verify_receipts:
            raise HopFailed(span, Fault("answered without a receipt", receipt=True))
        hop.history.append((step, position, inputs))
        if receipt is not None:
            hop.unchecked.append((receipt, step, reply.descriptor, inputs, outputs[0]))
        elif follows:  # read while the caller computes the next token; checked as soon as it comes
            hop.receipt = asyncio.ensure_future(self._receive_receipt(hop, step, inputs, outputs[0]))
        return outputs[0]

    async def _receive_receipt(self, hop: Hop, step: int, inputs: torch.Tensor, output: torch.Tensor) -> Reply | None:
        """Reads the receipt of the hop's ``step``: a message of its own, or riding in the answer to the next step
        (``Open.receipts_ride``), which is returned then (it was read early); checks it as soon as it comes."""
        try:
            async with asyncio.timeout(self.config.step_timeout):
                message = await hop.stream.receive()
        except Exception as e:
            hop.fail(Fault.of(e, f"sent no receipt for step {step}: "))
            return None
        early = message if message.is_answer else None
        receipt = message.receipt_for(step)
        if receipt is None:
            if self.config.verify_receipts:
                hop.fail(Fault(f"sent {message.describe()} where the receipt of step {step} was due", receipt=True))
            return early
        hop.unchecked.append((receipt.receipt, step, receipt.fingerprint, inputs, output))
        self._check_receipts([hop])
        return early

    async def _take_receipt(self, hop: Hop) -> Reply | None:
        """Waits for the receipt of the hop's last step (the node signs it while the next step computes, or once the
        stream is quiet); returns the next step's answer where the receipt rode in it."""
        if hop.receipt is None:
            return None
        receipt, hop.receipt = hop.receipt, None
        return await receipt

    async def _receive_answer(self, hop: Hop) -> Reply:
        """The answer to the request just sent, which comes after (or with) the receipt of the hop's previous step.
        (The request leaves first: writing to a node that died fails at once, where a read may wait for a timeout.)"""
        early = await self._take_receipt(hop)
        hop.check()  # the previous step's receipt failed its checks: fail over now, trust no answer after it
        return early if early is not None else await hop.stream.receive()

    def _check_receipts(self, hops: list[Hop]) -> None:
        """Checks the receipts of the steps just returned and signs each node's next voucher (on the loop, while
        the caller computes the next token). A bad receipt makes that hop's next step fail over."""
        for hop in hops:
            span, pending, hop.unchecked = hop.span, hop.unchecked, []
            for receipt, step, descriptor, inputs, output in pending:
                try:
                    signed = self.wallet.check_receipt(
                        receipt,
                        node_address=span.info.eth_address,
                        price_per_block=span.info.price_per_token,
                        start=span.start,
                        end=span.end,
                        inputs=inputs,
                        outputs=output,
                        session_id=hop.receipt_session,
                        verify=self.config.verify_receipts,
                        descriptor=descriptor,
                        dtype=span.info.dtype,
                        quant=span.info.quant,
                        model_id=self.model_hash,
                        step=step,
                        kind=ReceiptKind.INFERENCE,
                        adapter=self.manager.active_adapter is not None,
                    )
                    self.meter.accept(signed.receipt.amount)
                except ReceiptError as e:
                    hop.fail(Fault(f"dishonest receipt: {e}", receipt=True))
                except Exception as e:  # never let a check crash the loop: treat the hop as faulty
                    logger.warning(f"Checking a receipt from {span} failed", exc_info=True)
                    hop.fail(Fault(f"unreadable receipt: {e}", receipt=True))
            if pending and hop.fault is None:
                hop.voucher = self.wallet.voucher_for(span.info.eth_address, credit_limit=span.info.credit_limit)
                self.manager.mark_ok(span.peer_id)

    async def _run_hops(self, x: torch.Tensor, index: int, *, step: int, position: int) -> torch.Tensor:
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

    # ---- failover -----------------------------------------------------------------------------------------------

    def _replay_hop(self, hop: Hop, inputs: torch.Tensor, *, step: int, position: int, last: bool) -> torch.Tensor:
        """One hop of a replay. Each answer comes after the hop's previous receipt, which is checked as it comes;
        the ``last`` step also waits for its own (a node signs it while the next step computes, or once the stream
        goes quiet)."""

        async def step_with_receipt() -> torch.Tensor:
            output = await self._hop_step(hop, inputs, step=step, position=position)
            if last:
                if hop.receipt is not None:
                    hop.stream.flush()
                await self._take_receipt(hop)
                self._check_receipts([hop])
            return output

        output = self.runtime.run(step_with_receipt(), timeout=2 * self.config.step_timeout + 5)
        hop.check()
        return output

    def _replace(self, index: int) -> None:
        """Routes hop ``index``'s blocks through other nodes and replays its history to them in the original
        steps (same step numbers, positions and inputs), so their caches end up as the lost one was."""
        old = self.hops[index]
        old.close()
        self.failovers += 1
        for attempt in range(self.config.max_retries + 1):
            new_hops = self._open_route(old.span.start, old.span.end)
            try:  # a replay is paid work like any step: it counts against the budget before it is sent
                replayed = sum(inputs.shape[0] * inputs.shape[1] for _, _, inputs in old.history)
                self.meter.commit(replayed * route_price([hop.span for hop in new_hops]), "a failover's replay")
            except BudgetExceededError:
                for hop in new_hops:
                    hop.close()
                raise
            try:
                for i, (step, position, inputs) in enumerate(old.history):
                    x = inputs
                    for hop in new_hops:
                        x = self._replay_hop(hop, x, step=step, position=position, last=i == len(old.history) - 1)
                self.hops[index : index + 1] = new_hops
                logger.info(
                    f"Failover: blocks {old.span.start}:{old.span.end} moved from {old.span} to {new_hops}, "
                    f"replayed {len(old.history)} steps"
                )
                return
            except HopFailed as e:
                self.manager.ban(e.span.peer_id, e.reason, timeout=_waited(e))
                for hop in new_hops:
                    hop.close()
        raise RouteUnavailableError(
            f"Could not replace the route for blocks {old.span.start}:{old.span.end}: every replacement failed while "
            "the session's history was replayed to it. Retry later, or check `nectar swarm` for what is online.",
            start=old.span.start,
            end=old.span.end,
        )

    def _gave_up(self, failure: HopFailed, attempts: int) -> NectarClientError:
        """The error a step raises after ``attempts`` failures, named for the last one."""
        span, fault = failure.span, failure.fault
        message = f"Inference failed after {attempts} attempts; last error: {failure}"
        if fault.receipt:
            return ReceiptRejectedError(
                f"{message}. Nodes serving blocks {span.start}:{span.end} sent receipts that "
                "fail the client's checks; they are banned, retry later."
            )
        if fault.code is not None:
            return InferenceFailedError.of(fault.code, message)
        return RouteUnavailableError(
            f"{message}. No node serving blocks {span.start}:{span.end} finished the step; "
            "retry later, or check `nectar swarm` for what is online.",
            start=span.start,
            end=span.end,
        )

    # ---- public API -------------------------------------------------------------------------------------------

    def step(self, hidden_states: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Sends [B, T, H] new positions through every block; returns the output hidden states [B, T, H]."""
        if self.state is SessionState.CLOSED:
            raise SessionClosedError("This inference session is closed; open a new one")
        if hidden_states.ndim != 3 or hidden_states.shape[0] != self.batch_size:
            raise ValueError(
                f"hidden_states must be [batch={self.batch_size}, tokens, hidden], got {list(hidden_states.shape)}"
            )
        if self.position + hidden_states.shape[1] > self.max_length:
            raise ValueError(
                f"Session max_length {self.max_length} exceeded: at {self.position}, adding "
                f"{hidden_states.shape[1]}. Open the session with a larger max_length."
            )
        if prompts is not None:
            if self.position != 0:
                raise ValueError("prompts can only be sent with the first step")
            self.prompts = prompts.detach().float()
        step, position = self.step_index, self.position
        x = hidden_states.detach().float().cpu()
        index, failures = 0, 0
        while True:
            # nothing is sent that would take the generation past its budget (the retry after a failover included)
            self.meter.commit(x.shape[0] * x.shape[1] * route_price(self.route[index:]), f"step {step}")
            try:
                if index == 0 and self.push_mode.usable(self.hops, position):
                    run = self.push_mode.run(x, step=step, position=position)
                else:
                    run = self._run_hops(x, index, step=step, position=position)
                # the step's receipts are checked on the loop right after its output is handed back (no wake-up
                # of their own, and before the next step starts there)
                x = run_on_loop(
                    self.runtime.loop,
                    run,
                    len(self.hops) * (self.config.step_timeout + self.config.push_timeout + 5),
                    after=partial(self._check_receipts, list(self.hops)),
                )
                break
            except HopFailed as e:
                failures += 1
                self.manager.ban(e.span.peer_id, e.reason, timeout=_waited(e))
                if failures > self.config.max_retries:
                    raise self._gave_up(e, failures) from e
                if e.burned:  # a receipt for (session, step) may exist at a later hop: never sign the number twice
                    self.step_index += 1
                    step = self.step_index
                index, x = e.index, e.inputs
                try:
                    self._replace(index)
                except RouteUnavailableError as unavailable:
                    if e.fault.code is ErrorCode.CREDIT_LIMIT:  # no other node: say why this one refused (and what
                        raise self._gave_up(e, failures) from unavailable  # to do: reserve escrow for it)
                    raise
                # x is the input of hop `index`, whose replacement now holds the history: retry it
        self.position += hidden_states.shape[1]
        self.step_index += 1
        return x

    @property
    def route(self) -> list[RemoteSpan]:
        return [hop.span for hop in self.hops]

    def close(self) -> None:
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        try:  # the last step's receipts: the closing vouchers pay for them
            self.runtime.run(self._check_all(), timeout=30)
        except Exception:
            logger.debug("Could not check the last receipts", exc_info=True)
        finally:
            self.meter.closed()
        for hop in self.hops:
            voucher = self.wallet.voucher_for(hop.span.info.eth_address, fresh=True)
            try:
                if voucher is not None:  # settle the last step before leaving
                    self.runtime.loop.call_soon_threadsafe(hop.stream.pay, voucher)
                self.runtime.loop.call_soon_threadsafe(hop.close)
            except RuntimeError:
                pass

    async def _check_all(self) -> None:
        waiting = [hop for hop in self.hops if hop.receipt is not None]
        for hop in waiting:
            hop.stream.flush()
        receipts = [hop.receipt for hop in waiting]
        if receipts:  # flushed just now; a node that died must not hold up the close
            await asyncio.wait(receipts, timeout=min(5.0, self.config.step_timeout))
        self._check_receipts(self.hops)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite; through numpy where it can (5 us less than torch's two ops, every step)."""
    if tensor.dtype in _NUMPY_FLOATS and tensor.device.type == "cpu" and not tensor.requires_grad:
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


_NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)


def _waited(failure: HopFailed) -> float | None:
    """How long the failure took to show, if longer than an open's timeout (a step timeout): the ban's floor."""
    return getattr(failure, "waited", None)
