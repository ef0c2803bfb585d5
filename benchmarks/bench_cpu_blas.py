"""CPU products through the faster BLAS per row count (``models/cpu_blas.py``) against PyTorch's alone, end to end.

Two swarms of the same checkpoint and spans: one whose nodes run with ``NECTAR_CPU_BLAS=torch`` (every product through
PyTorch's MKL, as before), one as shipped (each node times both libraries at load). Each has its own client, whose LM
head follows its swarm's setting. Their generations alternate (calibrated, torch, calibrated, ...), so both see the
same machine; the ratio of the best runs and whether both gave the same greedy tokens are printed.

    python benchmarks/bench_cpu_blas.py --model tiny --threads 1 --push
"""
from __future__ import annotations

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)

from contextlib import ExitStack

import torch

from common import (
    NUM_LAYERS, alternating_decode, base_parser, best, checkpoint, distributed_model, emit, even_spans, local_swarm,
    set_threads,
)
from nectar.models.cpu_blas import CpuMatmul

SETTINGS = {"calibrated": "auto", "torch": "torch"}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--push", action="store_true", help="server-to-server push")
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    spans = even_spans(NUM_LAYERS, args.nodes)
    with ExitStack() as stack:
        clients, swarms = {}, {}
        for name, setting in SETTINGS.items():
            swarms[name] = stack.enter_context(local_swarm(path, spans, threads=args.threads,
                                                           env={"NECTAR_CPU_BLAS": setting}))
            clients[name] = distributed_model(path, swarms[name], push=args.push)
            stack.callback(clients[name].shutdown)
        clients["torch"].head.matmul = CpuMatmul()
        head_plan = clients["calibrated"].head.matmul.describe()
        node_plans = [next((line.split("CPU matmuls: ", 1)[1] for line in node.log().splitlines()
                            if "CPU matmuls: " in line), "?") for node in swarms["calibrated"].nodes]
        runs, tokens = alternating_decode(clients, max(args.repeats, 2))
    fastest = {name: best(timings) for name, timings in runs.items()}
    ratio = fastest["calibrated"].decode_tps / fastest["torch"].decode_tps
    same = torch.equal(tokens["calibrated"], tokens["torch"])
    figures = {"model": args.model, "threads": args.threads, "nodes": args.nodes, "push": args.push, "ratio": ratio,
               "same_tokens": same, "client_head": head_plan, "nodes_plans": node_plans,
               **{name: {"decode_tps": fastest[name].decode_tps, "run_medians_ms": [t.median_ms for t in runs[name]]}
                  for name in clients}}
    rows = [(name, f"{fastest[name].decode_tps:.1f} tok/s (best run), runs' median gaps "
                   f"{', '.join(f'{t.median_ms:.1f}' for t in runs[name])} ms") for name in clients]
    rows += [(f"node {i}", plan) for i, plan in enumerate(node_plans)]
    rows += [("client head", head_plan), ("calibrated / torch", f"{ratio:.3f}x decode, same tokens: {same}")]
    emit(f"CPU BLAS per row count vs PyTorch's alone, {args.model}, {args.nodes} nodes{', push' if args.push else ''}, "
         f"{args.threads} thread(s)", rows, figures, args.json)


if __name__ == "__main__":
    main()
