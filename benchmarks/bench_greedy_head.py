"""Greedy tokens from a bfloat16 pass plus a float32 check (``models/greedy_head.py``) against float32 logits.

One swarm, two clients on it: one whose head checks a bfloat16 pass (forced with ``--force``, else as its load-time
measurement chose), one that computes every float32 logit. Their generations alternate (check, float32, check, ...),
so both see the same machine; each run's median gap between tokens and the head's own time (final norm, LM head and
argmax) are printed, then the ratio of the best runs and whether both chose the same tokens.

    python benchmarks/bench_greedy_head.py --model tiny --threads 1 [--push] [--force]
"""
from __future__ import annotations

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)

import statistics

import torch

from nectar.models.greedy_head import LowPrecisionArgmax

from common import (
    NUM_LAYERS, alternating_decode, base_parser, checkpoint, distributed_model, emit, even_spans, local_swarm,
    set_threads, timed_head,
)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--push", action="store_true", help="server-to-server push")
    parser.add_argument("--force", action="store_true", help="use the check even where the load-time timing did not")
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    with local_swarm(path, even_spans(NUM_LAYERS, args.nodes), threads=args.threads) as swarm:
        clients = {"bf16-check": distributed_model(path, swarm, push=args.push),
                   "float32": distributed_model(path, swarm, push=args.push)}
        checked = clients["bf16-check"].head
        chosen_at_load = checked.greedy_argmax is not None
        if args.force and not chosen_at_load:
            checked.greedy_argmax = LowPrecisionArgmax(checked.lm_head.weight.t(), checked.lm_head.bias)
        clients["float32"].head.greedy_argmax = None
        head_seconds = {name: timed_head(model) for name, model in clients.items()}
        try:
            runs, tokens = alternating_decode(clients, max(args.repeats, 2))
        finally:
            for model in clients.values():
                model.shutdown()
    best = {name: max(timings, key=lambda t: t.decode_tps) for name, timings in runs.items()}
    head_ms = {name: statistics.median(seconds) * 1e3 for name, seconds in head_seconds.items()}
    ratio = best["bf16-check"].decode_tps / best["float32"].decode_tps
    figures = {"model": args.model, "threads": args.threads, "nodes": args.nodes, "push": args.push, "ratio": ratio,
               "chosen_at_load": chosen_at_load, "same_tokens": torch.equal(tokens["bf16-check"], tokens["float32"]),
               **{name: {"decode_tps": best[name].decode_tps, "head_ms": head_ms[name],
                         "run_medians_ms": [t.median_ms for t in runs[name]]} for name in clients}}
    rows = [(name, f"{best[name].decode_tps:.1f} tok/s (best run), runs' median gaps "
                   f"{', '.join(f'{t.median_ms:.1f}' for t in runs[name])} ms; head {head_ms[name]:.2f} ms")
            for name in clients]
    rows += [("check / float32", f"{ratio:.3f}x decode, same tokens: {figures['same_tokens']}, "
                                 f"chosen at load: {chosen_at_load}")]
    emit(f"greedy head, {args.model}, {args.nodes} nodes{', push' if args.push else ''}, {args.threads} thread(s)",
         rows, figures, args.json)


if __name__ == "__main__":
    main()
