"""The hand-off of generation steps from worker threads to the event loop: in order, nothing lost, and one wake-up
of the loop per batch (a loop that fell behind gets every pending step at once)."""

from __future__ import annotations

import asyncio
import threading
import time

from nectar.api.engine import Handoff


def test_a_busy_loop_gets_every_pending_item_in_one_batch_and_one_wakeup():
    async def main():
        handoff = Handoff(asyncio.get_running_loop())
        worker = threading.Thread(target=lambda: [handoff.put(i) for i in range(100)])
        worker.start()
        worker.join()  # the loop is blocked meanwhile: it is behind
        return await handoff.take(), handoff.wakeups

    items, wakeups = asyncio.run(main())
    assert items == list(range(100)) and wakeups == 1


def test_a_loop_that_keeps_up_gets_each_item_alone():
    async def main():
        handoff, taken = Handoff(asyncio.get_running_loop()), threading.Event()

        def work():
            for i in range(20):
                handoff.put(i)
                assert taken.wait(10)
                taken.clear()

        worker = threading.Thread(target=work)
        worker.start()
        batches = []
        for _ in range(20):
            batches.append(await handoff.take())
            taken.set()
        await asyncio.to_thread(worker.join)
        return batches, handoff.wakeups

    batches, wakeups = asyncio.run(main())
    assert batches == [[i] for i in range(20)] and wakeups == 20


def test_many_threads_lose_nothing_and_keep_each_ones_order():
    async def main():
        handoff = Handoff(asyncio.get_running_loop())

        def work(t: int):
            for i in range(2000):
                handoff.put((t, i))
                if i % 500 == 0:
                    time.sleep(0.001)  # let the loop take some batches midway

        workers = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for worker in workers:
            worker.start()
        got = []
        while len(got) < 8000:
            got += await asyncio.wait_for(handoff.take(), 10)
        return got, handoff.wakeups

    got, wakeups = asyncio.run(main())
    for t in range(4):
        assert [i for who, i in got if who == t] == list(range(2000))
    assert len(got) == 8000 and wakeups < 8000
