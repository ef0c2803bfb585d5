"""What audits cost against serving: the node's added per-step work (keeping each step's output in its audit log, next
to the inputs it kept already) and the swarm's re-execution work (q of the steps recomputed over their whole input
history), both as shares of the serving compute, on the built-in model (30 blocks, CPU).

The re-execution share is q x (a full causal forward over an audited step's history) / (a decode step), reported at
the ledger's default q (``spot_check_fraction``) and at ``--q`` from the same measurement. Profiled, the recompute is
``torch.nn.functional.linear`` (about 80%): matmuls over the history's tokens, nothing a cache could skip (the
audited step's output depends on every earlier token at every block), so its cost is set by q (docs/economics.md).
Steps and recomputes are interleaved over ``--sessions`` sessions and medians taken (a shared machine's noise).

    python benchmarks/audit/bench_audit_overhead.py --json overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nectar.ledger.core.config import Settings
from nectar.models import load_client_head, load_span
from nectar.node.audit import AuditLog

MODEL, BLOCKS = "smollm2-135m", 30


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - began) / repeats)
    return best


def record_cost(hidden: int, tokens: int, repeats: int = 2000) -> dict:
    """Seconds per AuditLog.record with and without the step's output (the difference is what this design adds)."""
    x, y = torch.randn(1, tokens, hidden), torch.randn(1, tokens, hidden)
    with_outputs, without = AuditLog(max_bytes=1 << 28, retention_s=1e9), AuditLog(max_bytes=1 << 28, retention_s=1e9)
    counter = iter(range(10**9))

    def plain():
        without.record(b"s" * 32, next(counter), 0, x, 0, BLOCKS)

    def kept():
        with_outputs.record(b"s" * 32, next(counter), 0, x, 0, BLOCKS, outputs=y)

    return {"without_outputs_s": timed(plain, repeats), "with_outputs_s": timed(kept, repeats)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--session-length", type=int, default=64, help="prefill 8, then decode steps up to this")
    parser.add_argument("--q", type=float, default=0.02, help="a second audit rate to report (0.02: the old default)")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    head, span = load_client_head(MODEL), load_span(MODEL, 0, BLOCKS)
    x = head.embed(torch.randint(0, head.vocab_size, (1, args.session_length))).float()
    with torch.inference_mode():
        steps, recomputes = [], []
        for _ in range(args.sessions):
            cache = span.new_cache(1, args.session_length)
            span(x[:, :8], cache=cache)
            for pos in range(8, args.session_length):
                began = time.perf_counter()
                span(x[:, pos : pos + 1], cache=cache)
                steps.append(time.perf_counter() - began)
                if pos % 8 == 0:  # an audit of this step: a full causal forward over its history
                    began = time.perf_counter()
                    span(x[:, : pos + 1])
                    recomputes.append(time.perf_counter() - began)
    step_s = statistics.median(steps)
    # the mean over audited positions of each one's median: histories of every length weigh the same
    per_position = [
        statistics.median(recomputes[i :: len(recomputes) // args.sessions])
        for i in range(len(recomputes) // args.sessions)
    ]
    recompute_s = sum(per_position) / len(per_position)
    default_q = Settings.model_fields["spot_check_fraction"].default
    hidden = span.hidden_size
    out = {
        "decode_step_s": step_s,
        "audit_recompute_s": recompute_s,
        # a disagreement costs a second recompute; an honest node's steps almost never need one
        "recompute_over_step": recompute_s / step_s,
        "default_q": default_q,
        "swarm_reexecution_share_of_serving": default_q * recompute_s / step_s,
        f"swarm_reexecution_share_at_q_{args.q:g}": args.q * recompute_s / step_s,
        "node_added_per_step": {},
    }
    for name, h, t in (("smollm2 decode", hidden, 1), ("7B decode", 4096, 1), ("7B prefill 128", 4096, 128)):
        cost = record_cost(h, t, repeats=200 if t > 1 else 2000)
        added = cost["with_outputs_s"] - cost["without_outputs_s"]
        out["node_added_per_step"][name] = cost | {"added_s": added}
    out["node_added_share_of_smollm2_cpu_step"] = out["node_added_per_step"]["smollm2 decode"]["added_s"] / step_s
    # the H100 figure of benchmarks/RESULTS.md: Llama-2-7B-shaped float16, 2 nodes, 74.4 tok/s (13.4 ms a step)
    out["node_added_share_of_7b_h100_step"] = out["node_added_per_step"]["7B decode"]["added_s"] / (1 / 74.4)
    print(json.dumps(out, indent=1))
    if args.json:
        path = Path(args.json)
        if not path.is_absolute() and len(path.parts) == 1:
            path = Path(__file__).parent.parent / "results" / "audit" / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "results": out}, indent=1))


if __name__ == "__main__":
    main()
