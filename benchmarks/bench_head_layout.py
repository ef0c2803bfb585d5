"""The client's LM head in [in, out] memory (what ``load_client_head`` does on CPU) against the usual [out, in].

One swarm, two clients on it: one as loaded, one whose head matrix is copied back into nn.Linear's usual layout.
Their generations alternate (new, usual, new, usual, ...), so both see the same machine; each run's median gap
between tokens and the head's own time are printed, then the ratio of the best runs.

    python benchmarks/bench_head_layout.py --model tiny --threads 1 [--push]
"""
from __future__ import annotations

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)

import statistics

import torch
from torch import nn

from nectar.models.cpu_blas import CpuMatmul

from common import (
    NUM_LAYERS, alternating_decode, base_parser, checkpoint, distributed_model, emit, even_spans, local_swarm,
    set_threads, timed_head,
)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--push", action="store_true", help="server-to-server push")
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    with local_swarm(path, even_spans(NUM_LAYERS, args.nodes), threads=args.threads) as swarm:
        clients = {"in-out": distributed_model(path, swarm, push=args.push),
                   "usual": distributed_model(path, swarm, push=args.push)}
        clients["in-out"].head.matmul = CpuMatmul()  # PyTorch's BLAS on both sides: the layout alone differs
        for model in clients.values():
            model.head.greedy_argmax = None  # float32 logits on both sides (bench_greedy_head.py measures the check)
        usual = clients["usual"].head
        usual.lm_head.weight = nn.Parameter(usual.lm_head.weight.detach().contiguous(), requires_grad=False)
        head_seconds = {name: timed_head(model) for name, model in clients.items()}
        try:
            runs, tokens = alternating_decode(clients, max(args.repeats, 2))
        finally:
            for model in clients.values():
                model.shutdown()
    best = {name: max(timings, key=lambda t: t.decode_tps) for name, timings in runs.items()}
    head_ms = {name: statistics.median(seconds) * 1e3 for name, seconds in head_seconds.items()}
    ratio = best["in-out"].decode_tps / best["usual"].decode_tps
    figures = {"model": args.model, "threads": args.threads, "nodes": args.nodes, "push": args.push, "ratio": ratio,
               "same_tokens": torch.equal(tokens["in-out"], tokens["usual"]),
               **{name: {"decode_tps": best[name].decode_tps, "head_ms": head_ms[name],
                         "run_medians_ms": [t.median_ms for t in runs[name]]} for name in clients}}
    rows = [(f"head {name}", f"{best[name].decode_tps:.1f} tok/s (best run), runs' median gaps "
                             f"{', '.join(f'{t.median_ms:.1f}' for t in runs[name])} ms; head {head_ms[name]:.2f} ms")
            for name in clients]
    rows += [("in-out / usual", f"{ratio:.3f}x decode, same tokens: {figures['same_tokens']}")]
    emit(f"client LM head layout, {args.model}, {args.nodes} nodes{', push' if args.push else ''}, "
         f"{args.threads} thread(s)", rows, figures, args.json)


if __name__ == "__main__":
    main()
