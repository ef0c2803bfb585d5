"""CPU products through the fastest library per row count (``models/cpu_blas.py``) against a baseline, end to end.

Two swarms of the same checkpoint and spans: one as shipped (each node times the libraries at load), one with the
``--baseline`` setting: ``torch`` (``NECTAR_CPU_BLAS=torch``, every product through PyTorch's MKL) or ``no-native``
(``NECTAR_NATIVE=off``: MKL or OpenBLAS, as before the native kernel). Each has its own client, whose LM head follows
its swarm's setting. Their generations alternate (calibrated, baseline, calibrated, ...), so both see the same
machine; the ratio of the best runs and whether both gave the same greedy tokens are printed.

First, in this process, one node's share of the blocks (``--step-blocks``) decodes single tokens with either plan in
turn: the compute step alone, without the swarm around it.

    python benchmarks/bench_cpu_blas.py --model tiny --threads 1 --push --baseline no-native
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import ExitStack, contextmanager

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch
from common import (
    NUM_LAYERS,
    alternating_decode,
    base_parser,
    best,
    checkpoint,
    distributed_model,
    emit,
    even_spans,
    local_swarm,
    set_threads,
)

from nectar.models import native
from nectar.models.cpu_blas import CpuMatmul

BASELINES = {"torch": {"NECTAR_CPU_BLAS": "torch"}, "no-native": {"NECTAR_NATIVE": "off"}}


@contextmanager
def environment(settings: dict):
    """``settings`` in this process's environment for a while (the native kernel is looked up again after)."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    native.load.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        native.load.cache_clear()


def baseline_plan(matrices, baseline: str) -> CpuMatmul:
    with environment(BASELINES[baseline]):
        return CpuMatmul.calibrate(matrices)


def step_times(path, blocks: int, repeats: int, baseline: str) -> dict:
    """Median seconds of one decode step through blocks [0, blocks) for each plan, runs alternating."""
    from nectar.node.backend import SpanBackend

    backend = SpanBackend(path, 0, blocks, dtype=torch.float32, device="cpu", show_progress=False)
    runner, hidden = backend.batch_runner, backend.blocks[0].hidden_size
    plans = {
        "calibrated": (runner.matmul, runner.native),  # the products' plan and the C decode layer (or None)
        "baseline": (
            baseline_plan([w for layer in runner.layers for w in layer.matrices], baseline),
            None if baseline == "no-native" else runner.native,
        ),
    }
    medians = {name: [] for name in plans}
    for _ in range(repeats):
        for name, (plan, decoder) in plans.items():
            runner.matmul, runner.native = plan, decoder
            caches = backend.new_caches(0, blocks, 1, 128)
            backend.inference_step(torch.randn(1, 16, hidden), caches, start=0, end=blocks, position=0)
            seconds = []
            for position in range(16, 76):
                began = time.perf_counter()
                backend.inference_step(torch.randn(1, 1, hidden), caches, start=0, end=blocks, position=position)
                seconds.append(time.perf_counter() - began)
            medians[name].append(statistics.median(seconds[5:]))
    return {name: statistics.median(values) for name, values in medians.items()} | {
        "plan": plans["calibrated"][0],
        "c_layer": plans["calibrated"][1] is not None,
    }


def main() -> None:
    parser = base_parser(__doc__, results_group="cpu_blas")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--push", action="store_true", help="server-to-server push")
    parser.add_argument("--step-blocks", type=int, default=NUM_LAYERS // 2, help="blocks of the in-process step")
    parser.add_argument("--baseline", choices=sorted(BASELINES), default="torch")
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    spans = even_spans(NUM_LAYERS, args.nodes)
    step = step_times(path, args.step_blocks, max(args.repeats, 5), args.baseline)
    step_ratio = step["baseline"] / step["calibrated"]
    with ExitStack() as stack:
        clients, swarms = {}, {}
        for name, settings in {"calibrated": {}, "baseline": BASELINES[args.baseline]}.items():
            swarms[name] = stack.enter_context(local_swarm(path, spans, threads=args.threads, env=settings))
            with environment(settings):  # the client's head follows its swarm's setting
                clients[name] = distributed_model(path, swarms[name], push=args.push)
            stack.callback(clients[name].shutdown)
        head_plan = clients["calibrated"].head.matmul.describe()
        node_plans = [
            next(
                (line.split("CPU matmuls: ", 1)[1] for line in node.log().splitlines() if "CPU matmuls: " in line), "?"
            )
            for node in swarms["calibrated"].nodes
        ]
        node_decoders = [
            next(
                (
                    line.split("decode step through ", 1)[1]
                    for line in node.log().splitlines()
                    if "decode step through " in line
                ),
                "C layer not built",
            )
            for node in swarms["calibrated"].nodes
        ]
        runs, tokens = alternating_decode(clients, max(args.repeats, 2))
    fastest = {name: best(timings) for name, timings in runs.items()}
    ratio = fastest["calibrated"].decode_tps / fastest["baseline"].decode_tps
    same = torch.equal(tokens["calibrated"], tokens["baseline"])
    figures = {
        "model": args.model,
        "threads": args.threads,
        "nodes": args.nodes,
        "push": args.push,
        "baseline": args.baseline,
        "ratio": ratio,
        "same_tokens": same,
        "client_head": head_plan,
        "nodes_plans": node_plans,
        "nodes_decode": node_decoders,
        "step": {
            "blocks": args.step_blocks,
            "c_layer": step["c_layer"],
            "calibrated_ms": step["calibrated"] * 1e3,
            "baseline_ms": step["baseline"] * 1e3,
            "ratio": step_ratio,
            "plan": step["plan"].describe(),
        },
        **{
            name: {"decode_tps": fastest[name].decode_tps, "run_medians_ms": [t.median_ms for t in runs[name]]}
            for name in clients
        },
    }
    rows = [
        (
            f"step, {args.step_blocks} blocks",
            f"calibrated {step['calibrated'] * 1e3:.2f} ms, {args.baseline} "
            f"{step['baseline'] * 1e3:.2f} ms: {step_ratio:.3f}x (C decode layer: {step['c_layer']}; "
            f"{step['plan'].describe()})",
        )
    ]
    rows += [
        (
            name,
            f"{fastest[name].decode_tps:.1f} tok/s (best run), runs' median gaps "
            f"{', '.join(f'{t.median_ms:.1f}' for t in runs[name])} ms",
        )
        for name in clients
    ]
    rows += [(f"node {i}", plan) for i, plan in enumerate(node_plans)]
    rows += [(f"node {i} decode", choice) for i, choice in enumerate(node_decoders)]
    rows += [("client head", head_plan), (f"calibrated / {args.baseline}", f"{ratio:.3f}x decode, same tokens: {same}")]
    push = ", push" if args.push else ""
    emit(
        f"CPU matmul library per row count vs {args.baseline}, {args.model}, {args.nodes} nodes{push}, "
        f"{args.threads} thread(s)",
        rows,
        figures,
        args.json,
    )


if __name__ == "__main__":
    main()
