"""CPU products through the faster BLAS per row count (``models/cpu_blas.py``) against PyTorch's alone, end to end.

Two swarms of the same checkpoint and spans: one whose nodes run with ``NECTAR_CPU_BLAS=torch`` (every product through
PyTorch's MKL, as before), one as shipped (each node times both libraries at load). Each has its own client, whose LM
head follows its swarm's setting. Their generations alternate (calibrated, torch, calibrated, ...), so both see the
same machine; the ratio of the best runs and whether both gave the same greedy tokens are printed.

First, in this process, one node's share of the blocks (``--step-blocks``) decodes single tokens with either plan in
turn: the compute step alone, without the swarm around it.

    python benchmarks/bench_cpu_blas.py --model tiny --threads 1 --push
"""
from __future__ import annotations

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)

import statistics
import time
from contextlib import ExitStack

import torch

from common import (
    NUM_LAYERS, alternating_decode, base_parser, best, checkpoint, distributed_model, emit, even_spans, local_swarm,
    set_threads,
)
from nectar.models.cpu_blas import CpuMatmul

SETTINGS = {"calibrated": "auto", "torch": "torch"}


def step_times(path, blocks: int, repeats: int) -> dict:
    """Median seconds of one decode step through blocks [0, blocks) for each plan, runs alternating."""
    from nectar.node.backend import SpanBackend

    backend = SpanBackend(path, 0, blocks, dtype=torch.float32, device="cpu", show_progress=False)
    runner, hidden = backend.batch_runner, backend.blocks[0].hidden_size
    plans = {"calibrated": runner.matmul, "torch": CpuMatmul()}
    medians = {name: [] for name in plans}
    for _ in range(repeats):
        for name, plan in plans.items():
            runner.matmul = plan
            caches = backend.new_caches(0, blocks, 1, 128)
            backend.inference_step(torch.randn(1, 16, hidden), caches, start=0, end=blocks, position=0)
            seconds = []
            for position in range(16, 76):
                began = time.perf_counter()
                backend.inference_step(torch.randn(1, 1, hidden), caches, start=0, end=blocks, position=position)
                seconds.append(time.perf_counter() - began)
            medians[name].append(statistics.median(seconds[5:]))
    return {name: statistics.median(values) for name, values in medians.items()} | {"plan": plans["calibrated"]}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--push", action="store_true", help="server-to-server push")
    parser.add_argument("--step-blocks", type=int, default=NUM_LAYERS // 2, help="blocks of the in-process step")
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    spans = even_spans(NUM_LAYERS, args.nodes)
    step = step_times(path, args.step_blocks, max(args.repeats, 5))
    step_ratio = step["torch"] / step["calibrated"]
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
               "step": {"blocks": args.step_blocks, "calibrated_ms": step["calibrated"] * 1e3,
                        "torch_ms": step["torch"] * 1e3, "ratio": step_ratio, "plan": step["plan"].describe()},
               **{name: {"decode_tps": fastest[name].decode_tps, "run_medians_ms": [t.median_ms for t in runs[name]]}
                  for name in clients}}
    rows = [(f"step, {args.step_blocks} blocks", f"calibrated {step['calibrated'] * 1e3:.2f} ms, torch "
                                             f"{step['torch'] * 1e3:.2f} ms: {step_ratio:.3f}x ({step['plan'].describe()})")]
    rows += [(name, f"{fastest[name].decode_tps:.1f} tok/s (best run), runs' median gaps "
                   f"{', '.join(f'{t.median_ms:.1f}' for t in runs[name])} ms") for name in clients]
    rows += [(f"node {i}", plan) for i, plan in enumerate(node_plans)]
    rows += [("client head", head_plan), ("calibrated / torch", f"{ratio:.3f}x decode, same tokens: {same}")]
    emit(f"CPU BLAS per row count vs PyTorch's alone, {args.model}, {args.nodes} nodes{', push' if args.push else ''}, "
         f"{args.threads} thread(s)", rows, figures, args.json)


if __name__ == "__main__":
    main()
