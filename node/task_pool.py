"""One compute thread per node: inference steps first (batched across sessions), then forward, then backward.

Running every torch call on one thread keeps CPU nodes from oversubscribing cores and is where concurrent sessions
meet: each round, the thread takes every pending inference step (oldest first, up to a token budget) and runs the
steps that can share a forward as one batch (``InferenceTask.batch_key``, see ``backend``). Sessions send one step
at a time, so taking all pending steps in arrival order gives every session one step per round (fair); a long
prefill beyond the budget waits for the next round instead of delaying everyone's decode. Training work (forward,
then backward) runs only when no inference is pending, unless it has waited ``training_max_wait`` seconds, so a busy
inference node still makes progress on training requests.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nectar.node import trace

logger = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    INFERENCE = 0
    FORWARD = 1
    BACKWARD = 2


@dataclass
class _Work:
    function: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    started: asyncio.Future | None = None  # resolved when the round with this work begins (to its number of works)
    submitted: float = field(default_factory=time.monotonic)

    @property
    def batch_key(self) -> tuple | None:
        key = getattr(self.function, "batch_key", None)
        return None if key is None else (type(self.function), key)

    @property
    def tokens(self) -> int:
        return getattr(self.function, "tokens", 1)

    @property
    def session(self) -> int:
        """Which session this work steps (an ``InferenceTask``'s), so rounds can be told apart."""
        return getattr(self.function, "session", id(self))


@dataclass
class ComputeStats:
    """Counters an operator (or a test) can read: how much batching actually happened."""

    batches: int = 0  # forwards run for inference steps
    steps: int = 0  # inference steps served
    max_batch: int = 0  # most steps ever run in one forward
    training: int = 0  # forward/backward requests served
    inference_seconds: float = 0.0  # spent computing inference rounds
    gather_seconds: float = 0.0  # spent waiting for a round's sessions (``gather_share``)

    @property
    def mean_batch(self) -> float:
        return self.steps / self.batches if self.batches else 0.0


_FORGET_S = 10.0  # a session unseen this long is no longer expected back soon: its timings are dropped
_round = threading.local()  # the compute thread's current round, until it is announced


def announce_round_started() -> None:
    """Called by a round's work on the compute thread once its device work is queued (``announces_start``): the
    loop may then use the CPU for the round's deferred work without holding up the launches. Once per round."""
    works = getattr(_round, "unannounced", None)
    if works:
        _round.unannounced = None
        _notify_started(works)


class ComputeThread:
    """Runs submitted work on one thread: batched inference first, then forward, then backward (FIFO within each).

    :param num_threads: torch intra-op threads for this thread's work (None = torch's default)
    :param max_batch_tokens: most new tokens one inference round takes (one task always fits)
    :param training_max_wait: seconds a forward/backward may wait behind inference before it runs anyway
    """

    def __init__(
        self,
        name: str = "nectar-compute",
        num_threads: int | None = None,
        *,
        max_batch_tokens: int = 4096,
        training_max_wait: float = 1.0,
        gather_share: float = 0.0,
        max_gather_rounds: float = 2.0,
    ):
        self.max_batch_tokens, self.training_max_wait = max_batch_tokens, training_max_wait
        self.gather_share, self.max_gather_rounds = gather_share, max_gather_rounds
        self._last_round_s = 0.0
        self._round_sessions: list[set] = [set(), set()]  # sessions of the last two rounds
        # session -> (when the round with its last step ended, how long it was away before its next step came
        # lately: a moving mean, None until it came back once); monotonic seconds
        self._seen: dict = {}
        self._pruned_at = 0.0
        self._last_spread = 0.0  # how long the last gathering took to bring every session back
        self._timed_out = False  # the last gathering ended at its deadline, not with every session back
        self._gathering = False  # waiting for a round's sessions (read by the event loop, see ``gathering``)
        self._queues: dict[Priority, collections.deque[_Work]] = {p: collections.deque() for p in Priority}
        self._condition = threading.Condition()
        self._stopped = False
        self._num_threads = num_threads
        self.stats = ComputeStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- called from event loops ------------------------------------------------------------------------------

    def submit(
        self, function: Callable[[], Any], priority: Priority, *, started: asyncio.Future | None = None
    ) -> asyncio.Future:
        """Queues ``function`` (a callable, or a batchable task such as ``InferenceTask``); await the result.

        ``started`` (a future of the caller's loop) is resolved as the compute thread begins the round that runs
        this work, always before the result: the caller may do its own deferred work while the round computes."""
        loop = asyncio.get_running_loop()
        work = _Work(function, loop, loop.create_future(), started)
        with self._condition:
            self._queues[Priority(priority)].append(work)
            self._condition.notify()
        return work.future

    def forget(self, session: int) -> None:
        """A session ended (its stream closed): later rounds stop waiting for its next step."""
        with self._condition:
            for sessions in self._round_sessions:
                sessions.discard(session)
            self._seen.pop(session, None)
            self._condition.notify()  # a gathering round may now have all it waits for

    def shutdown(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()

    @property
    def gathering(self) -> bool:
        """Whether inference steps wait for a round: queued, or being gathered for the next one."""
        return self._gathering or bool(self._queues[Priority.INFERENCE])

    @property
    def pending(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    # ---- the compute thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        from nectar.models.cpu_blas import use_threads

        use_threads(self._num_threads)  # per thread for PyTorch's OpenMP pool, so set here
        while True:
            with self._condition:
                while not self._stopped and not any(self._queues.values()):
                    self._condition.wait()
                if self._stopped:
                    return
                training = self._training_due()
                if training is not None:
                    self.stats.training += 1
                    batch = [training]
                else:
                    waited = time.perf_counter()
                    self._gather_inference()
                    self.stats.gather_seconds += time.perf_counter() - waited
                    batch = self._take_inference_round()
            _round.unannounced = batch
            if not getattr(batch[0].function, "announces_start", False):
                announce_round_started()
            began = time.perf_counter()
            trace.event("round", value=len(batch))
            if len(batch) == 1 and batch[0].batch_key is None:
                self._run_one(batch[0])
            else:
                self._run_round(batch)
            announce_round_started()  # before the results, whatever the work did
            trace.event("round_end", value=len(batch))
            if training is None:
                self._last_round_s = time.perf_counter() - began
                with self._condition:
                    self._round_sessions = [self._round_sessions[1], {work.session for work in batch}]
                    self._note_left(batch)
                self.stats.inference_seconds += self._last_round_s

    def _training_due(self) -> _Work | None:
        """The training item to run now, if any (caller holds the lock)."""
        inference = self._queues[Priority.INFERENCE]
        for priority in (Priority.FORWARD, Priority.BACKWARD):
            queue = self._queues[priority]
            if queue and (not inference or time.monotonic() - queue[0].submitted >= self.training_max_wait):
                return queue.popleft()
        return None

    def _gather_inference(self) -> None:
        """Waits briefly for the sessions of the last round to send their next steps (caller holds the lock).

        Replies to a round reach clients one after another, so the first next step arrives while most are still on their
        way; starting at once would split the sessions into rounds that each pay for reading all weights. The wait ends
        when as many steps are pending as the last two rounds had sessions (so rounds that split come back together), or
        after ``gather_share`` of the last round's compute time or 1.25 times what the last gathering took, whichever is
        longer (at most ``max_gather_rounds`` rounds), so a session that went quiet costs little. The second bound
        matters where rounds are cheap (a recorded GPU round) while replies still take a while to reach every session.
        The cap is counted in rounds, never in fixed time: a split group is away for a whole round of the other node
        sharing the GPU (a 70B shape: 50-100 ms), while a fixed cap far above short rounds (a 7B shape's 3 ms) lets two
        nodes' waits grow to it (docs/performance.md, "Fuller rounds"). After a wait that timed out, the next is drawn
        between one and two bounds (never past the cap): two nodes each holding one group and waiting for the other
        would otherwise time out together and stay split (four rounds a token instead of two); by chance one runs while
        the other still waits. Only sessions expected back within the cap are waited for (``_due``): where a route's
        other node holds them longer than this node's rounds take, starting at once costs less. A node sets it with
        ``--batch-wait``, by default 0.5 on a GPU (a round there costs about one read of the weights however many rows
        it holds) and off on a CPU (rounds that split let a route's nodes work as a pipeline).
        """
        queue = self._queues[Priority.INFERENCE]
        expected = self._expected()
        if self.gather_share <= 0 or expected <= 1 or len(queue) >= expected:
            return
        began = time.monotonic()
        limit = self.max_gather_rounds * self._last_round_s
        waited_for = self._due(began + limit)
        if not waited_for:  # every missing session is away for longer than the round a wait would save
            return
        bound = max(self.gather_share * self._last_round_s, 1.25 * self._last_spread)
        if self._timed_out:  # rounds split lately: a chance longer wait breaks a tie with another node's
            bound *= random.uniform(1.0, 2.0)  # not a secret: it only needs to differ between nodes
        deadline = began + min(limit, bound)
        self._gathering = True
        try:
            while not self._stopped and not self._arrived(waited_for):  # ``forget`` may end a wait meanwhile
                remaining = deadline - time.monotonic()
                if remaining <= 0:  # someone left, or replies now take longer: allow more next time
                    self._last_spread = min(limit, 2 * max(self._last_spread, 1e-3))
                    self._timed_out = True
                    return
                self._condition.wait(remaining)
            self._last_spread = time.monotonic() - began
            self._timed_out = False
        finally:
            self._gathering = False

    def _live(self) -> set:
        """The sessions a round may wait for: those of the last two rounds that have not ended."""
        return self._round_sessions[0] | self._round_sessions[1]

    def _expected(self) -> int:
        return len(self._live())

    def _pending(self) -> set:
        return {work.session for work in self._queues[Priority.INFERENCE]}

    def _due(self, horizon: float) -> set:
        """The sessions of the last two rounds with no step pending that should be back by ``horizon``: each is
        expected when its last round ended plus how long it was away lately (a session not yet seen twice is
        expected). A session held elsewhere for longer (at another node of its route, whose rounds take longer than
        this node's cap) is not waited for: the wait would cost more than the round it saves."""
        due = set()
        for session in self._live() - self._pending():
            left, away = self._seen.get(session, (None, None))
            if away is None or left + away <= horizon:
                due.add(session)
        return due

    def _arrived(self, waited_for: set) -> bool:
        """Whether every session a gathering waits for has a step pending or has ended (caller holds the lock)."""
        return (self._live() & waited_for) <= self._pending()

    def _note_left(self, batch: list[_Work]) -> None:
        """Records when the round's sessions left and, for those seen before, how long they were away (the time
        from the end of their previous round to their step's submission; caller holds the lock). Bounded: a session
        not seen for ``_FORGET_S`` is dropped (an ended stream's at once, ``forget``)."""
        now = time.monotonic()
        for work in batch:
            away = None
            if work.session in self._seen:
                left, last = self._seen[work.session]
                away = max(0.0, work.submitted - left)
                away = away if last is None else 0.5 * (last + away)
            self._seen[work.session] = (now, away)
        if now - self._pruned_at > 1.0:
            self._pruned_at = now
            for session in [s for s, (left, _) in self._seen.items() if now - left > _FORGET_S]:
                del self._seen[session]

    def _take_inference_round(self) -> list[_Work]:
        queue = self._queues[Priority.INFERENCE]
        taken = [queue.popleft()]
        tokens = taken[0].tokens
        while queue and tokens + queue[0].tokens <= self.max_batch_tokens:
            work = queue.popleft()
            taken.append(work)
            tokens += work.tokens
        return taken

    def _run_one(self, work: _Work) -> None:
        if work.future.cancelled():
            return
        try:
            result = work.function()
        except BaseException as e:  # delivered to the awaiting coroutine
            _deliver(work, error=e)
        else:
            _deliver(work, result=result)

    def _run_round(self, works: list[_Work]) -> None:
        groups: dict[Any, list[_Work]] = {}
        for work in works:
            if work.future.cancelled():
                continue
            key = work.batch_key
            groups.setdefault(key if key is not None else ("alone", id(work)), []).append(work)
        for key, members in groups.items():
            self.stats.batches += 1
            self.stats.steps += len(members)
            if len(members) > self.stats.max_batch:
                self.stats.max_batch = len(members)
                if len(members) > 1:
                    logger.info(f"Batched {len(members)} inference steps into one forward (a new high)")
            if len(members) == 1:
                self._run_one(members[0])
                continue
            try:
                results = members[0].function.run_batch([work.function for work in members])
            except BaseException:
                # one bad step must not fail the others: run each alone, so only its own session sees the error
                logger.debug("Batched step failed, retrying its steps one by one", exc_info=True)
                for work in members:
                    self._run_one(work)
                continue
            _deliver_all(members, results)


def _notify_started(works: list[_Work]) -> None:
    """Resolves the ``started`` futures of the round's works that asked to know when it begins, to the number of
    steps in the round."""
    _resolve([(work.loop, work.started, len(works)) for work in works if work.started is not None])


def _deliver(work: _Work, *, result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            work.loop.call_soon_threadsafe(_set_exception, work.future, error)
        else:
            work.loop.call_soon_threadsafe(_set_result, work.future, result)
    except RuntimeError:  # the loop is closed: nobody waits for this result any more
        pass


def _deliver_all(works: list[_Work], results: list) -> None:
    """A round's results in one loop callback: every waiting step wakes in the same loop pass, so each can send its
    output before any of them signs its receipt."""
    _resolve([(work.loop, work.future, result) for work, result in zip(works, results)])


def _resolve(items: list[tuple[asyncio.AbstractEventLoop, asyncio.Future, Any]]) -> None:
    """Sets each (loop, future, value)'s future to its value, with one callback per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, tuple[list, list]] = {}
    for loop, future, value in items:
        futures, values = by_loop.setdefault(loop, ([], []))
        futures.append(future)
        values.append(value)
    for loop, (futures, values) in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_results, futures, values)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass


def _set_results(futures: list[asyncio.Future], results: list) -> None:
    for future, result in zip(futures, results):
        _set_result(future, result)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
