"""Where a node's batch-1 decode round spends its GPU time (issue 25), and what the fused routes save.

On one GPU, for a Llama-shaped span (default: all 32 blocks of the 7B shape, float16):
  1. each weight matrix's product at 1 and 16 rows, in the node's [in, out] layout and PyTorch's [out, in]
     (``F.linear``), as achieved bandwidth, each recorded in a CUDA graph (no launch gaps);
  2. one session's decode round as the node runs it (a recorded round per step), per step and per replay;
  3. the per-kernel profile of one recorded round (kernels grouped by name: count and time per round);
  4. the same with each route of ``NECTAR_DECODE_ROUTE`` (eager, compiled), their replay time and their largest
     difference from the eager static step's output.
Prints a table and writes --json.

    python3 benchmarks/gpu/decode_profile.py --model llama2-7b --json /tmp/profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402,F401
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import checkpoint, log  # noqa: E402


def graph_time(fn, repeats: int = 20, rounds: int = 5) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph of ``repeats`` calls (best of ``rounds``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return min(replay_times(graph, rounds)) / repeats


def replay_times(graph, rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` replays of ``graph``, timed on the GPU."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def replay_time(graph, rounds: int = 20) -> float:
    """Seconds per replay of a recorded round (median of ``rounds``, after one warm replay)."""
    graph.replay()
    times = sorted(replay_times(graph, rounds))
    return times[len(times) // 2]


def products(runner, rows_list=(1, 16)) -> list[dict]:
    layer = runner.layers[0]
    out = []
    for name, weight in zip(("qkv", "o", "gate_up", "down"), layer.matrices):
        by_out = weight.t().contiguous()
        for rows in rows_list:
            x = torch.randn(rows, weight.shape[0], device=weight.device, dtype=weight.dtype)
            t_in_out = graph_time(lambda x=x, w=weight: x @ w)
            t_out_in = graph_time(lambda x=x, w=by_out: F.linear(x, w))
            nbytes = weight.numel() * weight.element_size()
            out.append(
                {
                    "matrix": name,
                    "shape": list(weight.shape),
                    "rows": rows,
                    "in_out_us": t_in_out * 1e6,
                    "out_in_us": t_out_in * 1e6,
                    "in_out_gbs": nbytes / t_in_out / 1e9,
                    "out_in_gbs": nbytes / t_out_in / 1e9,
                }
            )
    return out


def kernel_table(fn, rounds: int = 5) -> tuple[list[dict], int, float]:
    """Kernels of ``fn`` (one round) grouped by name: (rows, kernels per round, GPU time per round in us)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            fn()
        torch.cuda.synchronize()
    groups: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        name = event.name
        if name.startswith(("Memcpy", "Memset")) and "DtoD" not in name:
            continue
        groups.setdefault(name, []).append(event.device_time_total if hasattr(event, "device_time_total") else 0.0)
    rows = [
        {"kernel": name[:90], "per_round": len(times) / rounds, "us_per_round": sum(times) / rounds}
        for name, times in groups.items()
    ]
    rows.sort(key=lambda row: -row["us_per_round"])
    count = sum(len(t) for t in groups.values()) // rounds
    total = sum(row["us_per_round"] for row in rows)
    return rows, count, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--blocks", type=int, default=0, help="blocks to host (0: all)")
    parser.add_argument("--max-length", type=int, default=128, help="the session's cache (prompt + new tokens)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--routes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    from nectar.node.backend import SpanBackend

    dtype = getattr(torch, args.dtype)
    path = checkpoint(args.model, dtype=args.dtype, device="cuda")
    blocks = args.blocks or common.llama_config(args.model).num_hidden_layers
    weight_bytes = None
    report: dict = {"gpu": torch.cuda.get_device_name(0), "model": args.model, "blocks": blocks, "routes": {}}
    for route in args.routes:
        os.environ["NECTAR_DECODE_ROUTE"] = route
        began = time.perf_counter()
        backend = SpanBackend(path, 0, blocks, dtype=dtype, device="cuda", show_progress=False, batching=True)
        runner = backend.batch_runner
        log(f"[{route}] loaded {blocks} blocks in {time.perf_counter() - began:.1f}s: {runner.describe()}")
        if weight_bytes is None:
            weight_bytes = sum(w.numel() * w.element_size() for layer in runner.layers for w in layer.matrices)
            report["weight_bytes"] = weight_bytes
            report["products"] = products(runner)
            for row in report["products"]:
                log(
                    f"  {row['matrix']:8s} {row['shape']} x{row['rows']:<3d} [in,out] {row['in_out_us']:7.1f} us "
                    f"{row['in_out_gbs']:6.0f} GB/s   [out,in] {row['out_in_us']:7.1f} us {row['out_in_gbs']:6.0f} GB/s"
                )
        torch.manual_seed(0)
        hidden = backend.hidden_size
        caches = backend.new_caches(0, blocks, 1, args.max_length)
        backend.inference_step(torch.randn(1, 16, hidden), caches, start=0, end=blocks, position=0)
        xs = [torch.randn(1, 1, hidden) for _ in range(args.steps)]
        began = time.perf_counter()
        backend.inference_step(xs[0], caches, start=0, end=blocks, position=16)  # records the lone session
        record_s = time.perf_counter() - began
        times, outputs = [], []
        for i, x in enumerate(xs[1:], start=17):
            began = time.perf_counter()
            outputs.append(backend.inference_step(x, caches, start=0, end=blocks, position=i))
            times.append(time.perf_counter() - began)
        times.sort()
        step_ms = times[len(times) // 2] * 1e3
        decoder = backend.decode_graphs
        entry = next(iter(decoder._graphs.values()))
        replay = replay_time(entry.graph)
        kernels, count, total = kernel_table(entry.graph.replay)
        row = {
            "record_s": record_s,
            "step_ms_median": step_ms,
            "replay_ms": replay * 1e3,
            "tok_s": 1e3 / step_ms,
            "replay_bandwidth_gbs": weight_bytes / replay / 1e9,
            "kernels_per_round": count,
            "kernel_us_per_round": total,
            "top_kernels": kernels[:20],
            "recorded": decoder.recorded,
            "replays": decoder.replays,
            "last_output": outputs[-1].float().flatten()[:8].tolist(),
        }
        # the eager static step on the same inputs: the route's outputs must match it
        if route == "eager":
            report["reference_outputs"] = [o.float() for o in outputs]
        else:
            ref = report.get("reference_outputs")
            if ref:
                row["max_diff_vs_eager"] = max((a.float() - b).abs().max().item() for a, b in zip(outputs, ref))
                row["max_abs_eager"] = max(b.abs().max().item() for b in ref)
        report["routes"][route] = row
        log(
            f"[{route}] record {record_s:.2f}s, step {step_ms:.2f} ms ({1e3 / step_ms:.1f} tok/s), replay "
            f"{replay * 1e3:.2f} ms ({weight_bytes / replay / 1e9:.0f} GB/s of weights), {count} kernels "
            f"({total / 1e3:.2f} ms of kernel time)"
            + (f", max diff vs eager {row['max_diff_vs_eager']:.3g}" if "max_diff_vs_eager" in row else "")
        )
        for k in kernels[:12]:
            log(f"    {k['us_per_round']:8.1f} us  x{k['per_round']:5.0f}  {k['kernel']}")
        del backend, runner, caches, decoder, entry
        torch.cuda.empty_cache()
    report.pop("reference_outputs", None)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
