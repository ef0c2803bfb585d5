"""The compute thread's scheduler (node/task_pool.py): batching rounds, priorities, fairness, failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nectar.node.task_pool import ComputeThread, Priority


class _Step:
    """A batchable stand-in for ``InferenceTask``: records which batches it ran in."""

    runs: list = []

    def __init__(self, name: str, key=("span", 0, 4), tokens: int = 1, fail: bool = False):
        self.name, self.batch_key, self.tokens, self.fail = name, key, tokens, fail

    def __call__(self):
        _Step.runs.append((self.name,))
        if self.fail:
            raise ValueError(f"{self.name} is malformed")
        return self.name

    @staticmethod
    def run_batch(steps):
        _Step.runs.append(tuple(step.name for step in steps))
        if any(step.fail for step in steps):
            raise ValueError("one step in the batch is malformed")
        return [step.name for step in steps]


@pytest.fixture
def compute():
    _Step.runs = []
    thread = ComputeThread(max_batch_tokens=8, training_max_wait=0.2)
    yield thread
    thread.shutdown()


def _blocked(compute: ComputeThread) -> tuple[threading.Event, asyncio.Future]:
    """Occupies the compute thread until the event is set, so later submissions pile up."""
    gate = threading.Event()
    return gate, compute.submit(gate.wait, Priority.INFERENCE)


def test_pending_steps_share_one_forward_per_key(compute):
    async def scenario():
        gate, blocker = _blocked(compute)
        await asyncio.sleep(0.05)
        futures = [compute.submit(_Step(f"a{i}"), Priority.INFERENCE) for i in range(4)]
        futures += [compute.submit(_Step(f"b{i}", key=("span", 1, 3)), Priority.INFERENCE) for i in range(2)]
        gate.set()
        return await asyncio.gather(blocker, *futures)

    results = asyncio.run(scenario())
    assert results[1:] == ["a0", "a1", "a2", "a3", "b0", "b1"]
    assert ("a0", "a1", "a2", "a3") in _Step.runs and ("b0", "b1") in _Step.runs
    assert compute.stats.max_batch == 4 and compute.stats.steps >= 6


def test_a_round_stops_at_the_token_budget_in_arrival_order(compute):
    async def scenario():
        gate, blocker = _blocked(compute)
        await asyncio.sleep(0.05)
        # a 6-token prefill between decodes: the budget (8 tokens) splits the rounds, order is kept
        steps = [
            _Step("d0", tokens=1),
            _Step("d1", tokens=1),
            _Step("p", tokens=6),
            _Step("d2", tokens=1),
            _Step("d3", tokens=1),
        ]
        futures = [compute.submit(step, Priority.INFERENCE) for step in steps]
        gate.set()
        await asyncio.gather(blocker, *futures)

    asyncio.run(scenario())
    assert _Step.runs == [("d0", "d1", "p"), ("d2", "d3")]


def test_inference_runs_ahead_of_forward_and_backward(compute):
    order = []

    def record(name):
        return lambda: order.append(name)

    async def scenario():
        gate, blocker = _blocked(compute)
        await asyncio.sleep(0.05)
        futures = [
            compute.submit(record("backward"), Priority.BACKWARD),
            compute.submit(record("forward"), Priority.FORWARD),
            compute.submit(record("inference"), Priority.INFERENCE),
        ]
        gate.set()
        await asyncio.gather(blocker, *futures)

    asyncio.run(scenario())
    assert order == ["inference", "forward", "backward"]


def test_training_is_not_starved_by_a_busy_inference_queue(compute):
    async def scenario():
        stop = asyncio.Event()

        async def inference_client(index: int) -> int:
            served = 0
            while not stop.is_set():
                await compute.submit(lambda: time.sleep(0.01), Priority.INFERENCE)
                served += 1
            return served

        clients = [asyncio.create_task(inference_client(i)) for i in range(3)]
        await asyncio.sleep(0.05)  # the inference queue is never empty from here on
        began = time.monotonic()
        await compute.submit(lambda: None, Priority.BACKWARD)
        waited = time.monotonic() - began
        stop.set()
        return waited, await asyncio.gather(*clients)

    waited, served = asyncio.run(scenario())
    assert waited < 2.0  # ran after about training_max_wait (0.2 s), not after inference dried up
    assert all(count > 3 for count in served)  # and inference kept flowing meanwhile


def test_a_failing_step_fails_alone(compute):
    async def scenario():
        gate, blocker = _blocked(compute)
        await asyncio.sleep(0.05)
        futures = [
            compute.submit(_Step("ok0"), Priority.INFERENCE),
            compute.submit(_Step("bad", fail=True), Priority.INFERENCE),
            compute.submit(_Step("ok1"), Priority.INFERENCE),
        ]
        gate.set()
        return await asyncio.gather(blocker, *futures, return_exceptions=True)

    _, ok0, bad, ok1 = asyncio.run(scenario())
    assert (ok0, ok1) == ("ok0", "ok1")
    assert isinstance(bad, ValueError) and "bad is malformed" in str(bad)


def test_cancelled_steps_are_skipped(compute):
    async def scenario():
        gate, blocker = _blocked(compute)
        await asyncio.sleep(0.05)
        gone = compute.submit(_Step("gone"), Priority.INFERENCE)
        kept = compute.submit(_Step("kept"), Priority.INFERENCE)
        gone.cancel()  # its client closed the stream while the step waited
        gate.set()
        return await asyncio.gather(blocker, kept)

    assert asyncio.run(scenario())[1] == "kept"
    assert all("gone" not in run for run in _Step.runs)


class _SlowStep(_Step):
    """A step whose batch takes a while, so a round has a compute time to scale the gather window by."""

    @staticmethod
    def run_batch(steps):
        time.sleep(0.4)
        return _Step.run_batch(steps)


class _SessionStep(_SlowStep):
    """A slow step of a named session (the compute thread tells rounds' sessions apart by ``session``)."""

    def __init__(self, name: str, session: int):
        super().__init__(name)
        self.session = session


@pytest.mark.parametrize("gather_share, expected_round", [(0.0, ("c0",)), (1.0, ("c0", "c1", "c2"))])
def test_batch_wait_gathers_the_last_rounds_sessions(gather_share, expected_round):
    """With --batch-wait, a round waits (up to a share of the last round's time) until as many steps are pending
    as the last round ran; without it, the round starts with the first step that arrives."""
    _Step.runs = []
    compute = ComputeThread(gather_share=gather_share, max_gather_rounds=2.5)

    async def scenario():
        gate, blocker = _blocked(compute)
        await asyncio.sleep(0.05)
        first = [compute.submit(_SlowStep(f"r{i}"), Priority.INFERENCE) for i in range(3)]
        gate.set()
        await asyncio.gather(blocker, *first)  # a round of 3 steps that took 0.4 s
        late = [compute.submit(_SlowStep("c0"), Priority.INFERENCE)]
        await asyncio.sleep(0.15)  # the other two sessions' next steps come later, within the 0.4 s window
        late += [compute.submit(_SlowStep(f"c{i}"), Priority.INFERENCE) for i in (1, 2)]
        return await asyncio.gather(*late)

    try:
        assert asyncio.run(scenario()) == ["c0", "c1", "c2"]
    finally:
        compute.shutdown()
    rounds = [r for r in _Step.runs if r and r[0].startswith("c")]
    assert rounds[0] == expected_round


def test_a_gpu_node_gathers_its_rounds_by_default_and_a_cpu_node_does_not():
    """Unset, --batch-wait follows the device: a GPU round reads the weights once however many sessions it holds
    (rounds that split waste whole reads), a CPU round's cost grows with its rows."""
    from nectar.node.cli import node_config, node_parser
    from nectar.node.server import default_batch_wait

    assert node_config(node_parser().parse_args([])).batch_wait is None
    assert default_batch_wait("cuda") == default_batch_wait("cuda:1") == 0.5
    assert default_batch_wait("cpu") == 0.0
    assert node_config(node_parser().parse_args(["--batch-wait", "0"])).batch_wait == 0.0  # a GPU node may opt out


def test_two_nodes_sharing_one_device_bring_split_rounds_back_together():
    """Two nodes on one GPU (each round costs one read of its weights, whatever its rows) with their sessions split
    into two groups in opposite phase: each node holds one group and waits for the other, which waits at the other
    node. Equal waits time out together and the split lasts (each token then costs four rounds instead of two);
    waits that scale with the round and differ by chance let one node run while the other still waits."""
    device = threading.Lock()

    class _DeviceStep(_SessionStep):
        @staticmethod
        def run_batch(steps):
            with device:  # the GPU time-slices the two processes: their rounds take turns
                time.sleep(0.04)
            return [step.name for step in steps]

    first, second = (ComputeThread(gather_share=0.5) for _ in range(2))
    sessions, steps = 8, 24

    async def client(session: int, nodes: tuple) -> None:
        for step in range(steps):
            for node in nodes:
                await node.submit(_DeviceStep(f"s{session}", session), Priority.INFERENCE)

    async def scenario():
        # half the sessions start at the first node, half at the second: opposite phases from the first step
        await asyncio.gather(*(client(s, (first, second) if s % 2 else (second, first)) for s in range(sessions)))

    try:
        asyncio.run(scenario())
    finally:
        first.shutdown(), second.shutdown()
    # 2 * 24 steps of 8 sessions: 48 rounds of 8 if they merge, about twice as many rounds of 4 if they stay split
    rounds = first.stats.batches + second.stats.batches
    assert rounds <= 1.5 * 2 * steps, f"{rounds} rounds: the split groups never merged"


def test_a_round_does_not_wait_for_a_session_that_ended():
    """A closed stream tells the compute thread (``forget``): the next round starts with the sessions still there
    instead of waiting out the gather window for a step that will never come."""
    _Step.runs = []
    compute = ComputeThread(gather_share=5.0, max_gather_rounds=12.5)  # a window of seconds after a 0.4 s round

    async def scenario():
        gate, blocker = _blocked(compute)
        await asyncio.sleep(0.05)
        first = [compute.submit(_SessionStep(f"r{i}", session=i), Priority.INFERENCE) for i in range(3)]
        gate.set()
        await asyncio.gather(blocker, *first)
        # a second round of the three, so the last two rounds hold only them
        await asyncio.gather(*(compute.submit(_SessionStep(f"s{i}", session=i), Priority.INFERENCE) for i in range(3)))
        compute.forget(2)  # the third session's stream closed
        began = time.monotonic()
        late = [compute.submit(_SessionStep(f"c{i}", session=i), Priority.INFERENCE) for i in (0, 1)]
        await asyncio.gather(*late)
        return time.monotonic() - began

    try:
        elapsed = asyncio.run(scenario())
    finally:
        compute.shutdown()
    # 0.4 s of compute; waiting for the ended session would add at least 2 s (the window is 5 x 0.4 s)
    assert elapsed < 1.5, f"the round waited {elapsed:.1f} s for a session that had ended"


class _ShortStep(_SessionStep):
    """A 4 ms round, as a recorded round of a 7B shape's half takes about 3 ms."""

    def __call__(self):
        return self.run_batch([self])[0]

    @staticmethod
    def run_batch(steps):
        time.sleep(0.004)
        return [step.name for step in steps]


def _steady_and_away(compute: ComputeThread, steps: int = 40, away_s: float = 0.03) -> float:
    """Session 0 steps back to back while session 1 comes for one round, then stays away ``away_s`` (at another
    node of its route); returns how long session 0's steps took."""
    done = asyncio.Event()

    async def steady() -> float:
        began = time.monotonic()
        for _ in range(steps):
            await compute.submit(_ShortStep("a", 0), Priority.INFERENCE)
        done.set()
        return time.monotonic() - began

    async def away() -> None:
        while not done.is_set():
            await compute.submit(_ShortStep("b", 1), Priority.INFERENCE)
            await asyncio.sleep(away_s)

    async def scenario() -> float:
        elapsed, _ = await asyncio.gather(steady(), away())
        return elapsed

    try:
        return asyncio.run(scenario())
    finally:
        compute.shutdown()


def test_a_short_round_never_waits_longer_than_two_rounds():
    """The wait is capped in rounds, not in fixed time: a 7B shape's recorded rounds take 3 ms, and where a session
    comes back only now and then (it is away at another node of its route), a 50 ms cap let every round wait up to
    it (two nodes on an H100, 16 sessions: 146.8 tok/s against 638.8 without waiting, stop 43)."""
    step = _steady_and_away(ComputeThread(gather_share=0.5)) / 40
    # a 4 ms round and at most two rounds' wait: 12 ms a step at worst; a 50 ms cap let the waits grow to it
    assert step < 0.025, f"{step * 1e3:.1f} ms a step: rounds of 4 ms waited longer than two rounds"


def test_a_round_does_not_wait_for_a_session_away_for_longer_than_the_cap():
    """A session held elsewhere for longer than the rounds a wait may cost (at the other node of a 7B pair: its
    rounds and two more replies) is not waited for: the steady session's rounds start at once, and the away session
    joins whichever round is gathering when it comes back (two nodes on an H100, 16 sessions: 450.7 tok/s with the
    wait against 596.2 without, stop 44)."""
    compute = ComputeThread(gather_share=0.5)
    elapsed = _steady_and_away(compute)
    # waiting up to two 4 ms rounds each time the away session is missing: most of the time goes to gathering
    gathered = compute.stats.gather_seconds
    assert gathered < 0.25 * elapsed, f"{gathered * 1e3:.0f} of {elapsed * 1e3:.0f} ms waiting for the away session"


def test_a_gpu_node_keeps_caches_in_pages_by_default_and_a_cpu_node_does_not():
    """Unset, --kv-page-size follows the device: pages on a GPU (one recording per round size serves any sessions),
    each session its own cache on a CPU (the decode rounds' C attention reads it where it lies); either may opt out."""
    from nectar.node.cli import node_config, node_parser
    from nectar.node.server import default_kv_page_size

    assert node_config(node_parser().parse_args([])).kv_page_size is None
    assert default_kv_page_size("cuda") == default_kv_page_size("cuda:1") == 16
    assert default_kv_page_size("cpu") == 0
    assert node_config(node_parser().parse_args(["--kv-page-size", "0"])).kv_page_size == 0
