"""What keeping audit records on disk adds per step (issue 21): ``AuditLog.admit`` + ``record`` with the records
appended to segment files in a folder, against the same in memory, for SmolLM2's hidden size (576) and a 4096-wide
row (a 7B model), decode steps (1 token) and a 128-token prefill; and how long a restarted node takes to read the
index back.

``*_us_per_step`` is the time ``admit`` + ``record`` hold the caller (the node's event loop): with the writer thread
the write itself happens off it, and ``disk_written_us_per_step`` is until the record is written (what the step
awaits, off the loop, before its receipt is signed). Runs against older trees too (their ``record`` writes inline).

    python benchmarks/audit/bench_audit_disk.py --folder /path/on/the/nodes/disk [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from nectar.node.audit import AuditLog


def per_step(log: AuditLog, hidden: int, tokens: int, repeats: int) -> tuple[float, float]:
    """(best mean time admit + record hold the caller, best mean time until the record is written), over 3 trials."""
    x, y = torch.randn(1, tokens, hidden), torch.randn(1, tokens, hidden)
    best_stall = best_written = float("inf")
    for trial in range(3):
        stalled = 0.0
        began = time.perf_counter()
        for i in range(repeats):
            t0 = time.perf_counter()
            log.admit(2 * x.nbytes, new=False)
            written = log.record(b"%031d" % (i // 64) + bytes([trial]), i % 64, i % 64, x, 0, 30, outputs=y)
            stalled += time.perf_counter() - t0
            if written is not None:  # the step awaits it (off the event loop) before signing its receipt
                written.result()
        best_written = min(best_written, (time.perf_counter() - began) / repeats)
        best_stall = min(best_stall, stalled / repeats)
    return best_stall, best_written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="where the segment files go (default: a temp folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for name, hidden, tokens, repeats in (
            ("576 decode", 576, 1, 5000),
            ("4096 decode", 4096, 1, 5000),
            ("4096 prefill 128", 4096, 128, 20),
        ):
            memory = AuditLog(max_bytes=1 << 34, retention_s=1e9)
            disk = AuditLog(
                max_bytes=1 << 30, retention_s=1e9, folder=f"{folder}/{hidden}-{tokens}", max_disk_bytes=1 << 40
            )
            (m, _), (d, d_written) = per_step(memory, hidden, tokens, repeats), per_step(disk, hidden, tokens, repeats)
            disk.close()
            began = time.perf_counter()
            again = AuditLog(
                max_bytes=1 << 30, retention_s=1e9, folder=f"{folder}/{hidden}-{tokens}", max_disk_bytes=1 << 40
            )
            reload_s = time.perf_counter() - began
            out[name] = {
                "memory_us_per_step": m * 1e6,
                "disk_us_per_step": d * 1e6,
                "disk_written_us_per_step": d_written * 1e6,
                "record_bytes": 2 * hidden * tokens * 4,
                "reload_s": reload_s,
                "records_reloaded": 3 * repeats,
                "index_memory_bytes": again.memory_bytes,
            }
            print(name, json.dumps(out[name]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
