"""Micro-benchmark: what the one-receipt-per-work-key guard (node/signed_work.py) adds to each step's event-loop time.

Per step the node computes the work key, takes it before the compute and records it once the receipt is signed
(one 32-byte append to the journal in its key folder). Measured with the guard already holding ``keys`` keys (a busy
node's window), and the restart: reading a journal of that many keys back.
Run: PYTHONPATH=.pkgroot python benchmarks/bench_signed_work.py [keys]
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time

from nectar.node.signed_work import SignedWork
from nectar.wire import receipts as schema


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(keys: int = 1_000_000, steps: int = 200_000) -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = SignedWork(folder)
        session, commitment = os.urandom(32), os.urandom(32)
        began = time.perf_counter()
        for step in range(keys):  # fill the window
            key = schema.work_key(session, 0, 12, 0, step)
            work.take(key)
            work.signed(key, commitment)
        fill = time.perf_counter() - began

        session = os.urandom(32)
        began = time.perf_counter()
        for step in range(steps):
            schema.work_key(session, 0, 12, 0, step)
        key_us = (time.perf_counter() - began) / steps * 1e6
        began = time.perf_counter()
        for step in range(steps):
            key = schema.work_key(session, 0, 12, 0, keys + step)
            work.take(key)
            work.signed(key, commitment, ({"receipt": step}, b""))
        step_us = (time.perf_counter() - began) / steps * 1e6
        work.close()
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))

        gc.collect()
        before = _rss()
        began = time.perf_counter()
        again = SignedWork(folder)
        load = time.perf_counter() - began
        assert len(again) == keys + steps
        gc.collect()
        per_key = (_rss() - before) / len(again)
        print(f"guard per step: {step_us:.2f} us (of which the work key {key_us:.2f} us), {keys:,} keys held")
        print(f"fill: {fill / keys * 1e6:.2f} us a key; journal {size / (keys + steps):.0f} bytes a key on disk")
        print(f"restart: {load:.2f} s to read {keys + steps:,} keys back; ~{per_key:.0f} bytes of memory a key")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
