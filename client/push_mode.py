"""Push mode (``ClientConfig.push``): a step goes to every hop at once and each hop pushes its output straight to the
next one (``nectar.node.push``), instead of the client relaying it hop by hop.

The client still gets every hop's output and receipt, so history, checks and failover stay the session's. A push
that does not come within ``push_timeout`` is cancelled and the client relays that step from the hop that missed
it; after ``push_misses`` such steps in a row (a firewall between nodes, say), the session stops asking for pushes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import torch

from nectar.client.config import ClientConfig
from nectar.client.hop_stream import Fault, Hop, HopFailed, HopState, Reply

logger = logging.getLogger(__name__)


class PushSession(Protocol):
    """What push mode needs of its session (``InferenceSession``), which owns the hops, checks and relay."""

    config: ClientConfig
    hops: list[Hop]
    prompts: torch.Tensor | None

    def _take_voucher(self, hop: Hop) -> dict | None: ...

    async def _receive_answer(self, hop: Hop) -> Reply: ...

    def _accept(self, hop: Hop, inputs: torch.Tensor, reply: Reply, *, step: int, position: int) -> torch.Tensor: ...

    async def _run_hops(self, x: torch.Tensor, index: int, *, step: int, position: int) -> torch.Tensor: ...


class PushMode:
    """Runs a session's steps with pushes between its hops, and counts how that went."""

    def __init__(self, session: PushSession):
        self.session, self.config = session, session.config
        self.pushed_steps = 0  # steps every hop of which was served by a push
        self.fallbacks = 0  # steps relayed after a missing push
        self.misses = 0  # fallbacks in a row: pushes that never come cost push_timeout each

    def usable(self, hops: list[Hop], position: int) -> bool:
        """Push needs a direct lane at every hop that receives one, and no deep prompts to hand out (they travel
        with the first step's tensors)."""
        return (
            self.config.push
            and self.misses < self.config.push_misses
            and len(hops) > 1
            and all(hop.span.info.direct_address for hop in hops[1:])
            and not (position == 0 and self.session.prompts is not None)
            and all(hop.state is HopState.OPEN for hop in hops)
        )

    async def run(self, x: torch.Tensor, *, step: int, position: int) -> torch.Tensor:
        """Sends the step to every hop at once: the first gets ``x``, each later one its input pushed by the hop
        before it. Answers are taken in route order, so each hop's input (the previous output) is known when its
        output and receipt are checked. From a hop whose push did not come, the step is relayed as without push."""
        session, hops = self.session, self.session.hops
        for i, hop in enumerate(hops):
            push_to = (hops[i + 1].span.info.direct_address, hops[i + 1].push_token) if i + 1 < len(hops) else None
            hop.stream.send_step(
                [x] if i == 0 else [],
                step=step,
                position=position,
                voucher=session._take_voucher(hop),
                push_to=push_to,
                pushed=i > 0,
            )
            hop.pending = asyncio.ensure_future(session._receive_answer(hop))
            if i == 0:
                await asyncio.sleep(0)  # the first hop's request leaves before the others are serialized
        for i, hop in enumerate(hops):
            try:
                if i > 0:
                    await self._await_push(hop, step)
                async with asyncio.timeout(self.config.step_timeout):  # not wait_for: on 3.11 a task a step
                    reply = await hop.pending
                hop.pending = None
                if reply.push_missing:
                    await self._cancel_pushes(hops[i + 1 :], step)  # nothing came to them either: hop i never ran
                    self.fallbacks += 1
                    self.misses += 1
                    logger.debug(f"No push reached {hop.span} at step {step}; relaying from there")
                    return await session._run_hops(x, i, step=step, position=position)
                x_next = session._accept(hop, x, reply, step=step, position=position)
            except Exception as e:
                hop.pending = None
                failure = e if isinstance(e, HopFailed) else HopFailed(hop.span, Fault.of(e))
                failure.index, failure.inputs = i, x
                failure.burned = await self._cancel_pushes(hops[i + 1 :], step)
                raise failure
            x = x_next
        self.pushed_steps += 1
        self.misses = 0
        return x

    async def _await_push(self, hop: Hop, step: int) -> None:
        """Gives the push ``push_timeout`` (counted from the previous hop's answer), then cancels it: a hop that
        got its push meanwhile answers anyway, one still waiting answers ``push_missing``."""
        done, _ = await asyncio.wait({hop.pending}, timeout=self.config.push_timeout)
        if not done:
            hop.stream.cancel(step)

    async def _cancel_pushes(self, hops: list[Hop], step: int) -> bool:
        """Cancels steps still waiting for a push and drains their answers; True if any hop computed the step
        anyway (its receipt for this step number exists, so a retry must not reuse the number)."""
        computed = False
        for hop in hops:
            if hop.pending is not None and not hop.pending.done():
                hop.stream.cancel(step)
        for hop in hops:
            if hop.pending is None:
                continue
            try:
                reply = await asyncio.wait_for(hop.pending, self.config.step_timeout)
                computed = computed or bool(reply.outputs)
                if reply.receipt_follows:  # a step computed anyway: its receipt is not used
                    hop.stream.flush()
                    await asyncio.wait_for(hop.stream.receive(), self.config.step_timeout)
            except Exception as e:  # its stream is gone: the next step fails over from it
                hop.fail(Fault.of(e, "failed while its push was cancelled: "))
            hop.pending = None
        return computed
