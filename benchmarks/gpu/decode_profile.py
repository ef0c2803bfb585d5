"""Where a node's batch-1 decode round spends its GPU time (issue 25), and what the fused routes save.

On one GPU, for a Llama-shaped span (default: all 32 blocks of the 7B shape, float16):
  1. each weight matrix's product at 1 and 16 rows, in the node's [in, out] layout and PyTorch's [out, in]
     (``F.linear``), as achieved bandwidth, each recorded in a CUDA graph (no launch gaps);
  2. one session's decode round as the node runs it (a recorded round per step), per step and per replay;
  3. the per-kernel profile of one recorded round (kernels grouped by name: count and time per round);
  4. the same with each route of ``NECTAR_DECODE_ROUTE`` (eager, triton, compiled), their replay time, their
     largest difference from the eager static step's output and the share of the first timed round's values equal to it;
  ``--rows N`` profiles a round of N sessions (equal caches: the pooled recording) instead of one session's.
Prints a table and writes --json.

    python3 benchmarks/gpu/decode_profile.py --model llama2-7b --json /tmp/profile.json

``--churn N`` measures instead a churning mix of N sessions (one leaves and another arrives every few rounds, rounds
split at random) through both ways a node records rounds: per composition of sessions (``GraphedDecoder``) and over
the page pool (``PagedDecoder``, ``--page-size``): recordings, round times (median, p90, total), the replay time of
the pool's largest round, and the largest difference between the two routes' outputs. ``--device cpu`` is a smoke
run (no graphs: the composition route runs eagerly, the paged step without capture):

    python3 benchmarks/gpu/decode_profile.py --churn 16 --model llama2-7b --json /tmp/churn.json
    python3 benchmarks/gpu/decode_profile.py --churn 6 --model tiny --device cpu --dtype float32 --rounds 24
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


def round_of(backend, sessions: list, inputs: list, position: int) -> list:
    """One decode round of ``sessions`` (each a span's caches) at ``position``, as the node's compute thread runs it."""
    blocks = len(sessions[0])
    tasks = [
        backend.inference_task(x, caches, start=0, end=blocks, position=position) for x, caches in zip(inputs, sessions)
    ]
    return backend.run_inference(tasks)


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


def churn(args) -> dict:
    """The churning mix of ``args.churn`` sessions through the composition route and the paged route."""
    import gc

    dtype, device = getattr(torch, args.dtype), args.device
    path = checkpoint(args.model, dtype=args.dtype, device=device)
    blocks = args.blocks or common.llama_config(args.model).num_hidden_layers
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "model": args.model,
        "blocks": blocks,
        "sessions": args.churn,
        "rounds": args.rounds,
        "page_size": args.page_size,
        "routes": {},
    }
    outputs = {}
    for route, page_size in (("composition", 0), ("paged", args.page_size)):
        row, outputs[route] = churn_route(args, path, blocks, dtype, page_size)
        gc.collect()  # the route's backend and caches go before the next loads
        if device == "cuda":
            torch.cuda.empty_cache()
        report["routes"][route] = row
        replay = row.get("largest_replay_ms")
        log(
            f"[{route}] {row['recorded']} recordings, {row['replays']} replays of {row['round_times']} rounds; "
            f"round median {row['round_ms_median']:.2f} ms, p90 {row['round_ms_p90']:.2f} ms, total "
            f"{row['total_s']:.2f}s"
            + (f"; a replay of {row['largest_replay_rows']} rows {replay:.2f} ms" if replay else "")
        )
    pairs = zip(outputs["composition"], outputs["paged"])
    report["max_diff_paged_vs_composition"] = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    log(f"largest difference between the routes' outputs: {report['max_diff_paged_vs_composition']:.3g}")
    return report


def churn_route(args, path, blocks: int, dtype, page_size: int) -> tuple[dict, list]:
    """One route's run of the churning mix (the same arrivals, prompts, splits and inputs for every route)."""
    import gc
    import random

    from nectar.node.backend import SpanBackend

    device = args.device
    backend = SpanBackend(
        path, 0, blocks, dtype=dtype, device=device, show_progress=False, page_size=page_size,
        cache_bytes=args.cache_mb * 2**20,
    )  # fmt: skip
    decoder = backend.paged if page_size else backend.decode_graphs
    hidden = backend.hidden_size
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    sessions: dict[int, list] = {}  # name -> [caches, position]
    outputs: list[torch.Tensor] = []
    times: list[float] = []
    opened = 0

    def arrive() -> None:
        nonlocal opened
        caches = backend.new_caches(0, blocks, 1, args.max_length)
        prompt = rng.randint(4, 32)
        x = torch.randn(1, prompt, hidden, generator=generator)
        backend.inference_step(x, caches, start=0, end=blocks, position=0)
        sessions[opened] = [caches, prompt]
        opened += 1

    def leave(name: int) -> None:
        del sessions[name]
        gc.collect()  # the pool's pages go back now
        arrive()

    for _ in range(args.churn):
        arrive()
    for index in range(args.rounds):
        if index and index % args.leave_every == 0:  # the oldest leaves, another arrives
            leave(min(sessions))
        for name in [n for n, (_, position) in sessions.items() if position + 1 >= args.max_length]:
            leave(name)  # out of room
        names = sorted(sessions)
        cut = rng.randint(1, len(names)) if rng.random() < args.split else len(names)
        for group in (names[:cut], names[cut:]):  # a round, or a round split in two (sessions late)
            if not group:
                continue
            xs = [torch.randn(1, 1, hidden, generator=generator) for _ in group]
            tasks = [
                backend.inference_task(x, sessions[n][0], start=0, end=blocks, position=sessions[n][1])
                for x, n in zip(xs, group)
            ]
            began = time.perf_counter()
            outputs.extend(backend.run_inference(tasks))
            times.append(time.perf_counter() - began)
            for n in group:
                sessions[n][1] += 1
    ordered = sorted(times)
    row = {
        "recorded": decoder.recorded if decoder is not None else 0,
        "replays": decoder.replays if decoder is not None else 0,
        "round_times": len(times),
        "round_ms_median": ordered[len(ordered) // 2] * 1e3,
        "round_ms_p90": ordered[int(len(ordered) * 0.9)] * 1e3,
        "total_s": sum(times),
        "sessions_opened": opened,
    }
    if device == "cuda":  # the pool (paged) or the sessions' caches, plus every recording's private memory
        row["cuda_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
    graphs = getattr(decoder, "_graphs", {})
    if graphs:
        entry = max(graphs.values(), key=lambda entry: entry.input.shape[0])
        if entry.graph is not None:
            row["largest_replay_rows"] = entry.input.shape[0]
            row["largest_replay_ms"] = replay_time(entry.graph) * 1e3
    return row, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--blocks", type=int, default=0, help="blocks to host (0: all)")
    parser.add_argument("--max-length", type=int, default=128, help="the session's cache (prompt + new tokens)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rows", type=int, default=1, help="sessions in the profiled round (one recording)")
    parser.add_argument("--routes", nargs="+", default=["eager", "triton"])
    parser.add_argument("--json")
    parser.add_argument("--churn", type=int, default=0, help="sessions of a churning mix (0: the profile)")
    parser.add_argument("--rounds", type=int, default=200, help="--churn: decode rounds")
    parser.add_argument("--leave-every", type=int, default=8, help="--churn: rounds between departures")
    parser.add_argument("--split", type=float, default=0.3, help="--churn: share of rounds split in two")
    parser.add_argument("--page-size", type=int, default=16, help="--churn: tokens per page of the paged route")
    parser.add_argument("--cache-mb", type=int, default=4096, help="--churn: the KV budget (the pool's size)")
    parser.add_argument("--device", default="cuda", help="--churn: cpu for a smoke run")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.churn:
        report = churn(args)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return
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
        sessions = [backend.new_caches(0, blocks, 1, args.max_length) for _ in range(args.rows)]
        for caches in sessions:
            backend.inference_step(torch.randn(1, 16, hidden), caches, start=0, end=blocks, position=0)
        xs = [[torch.randn(1, 1, hidden) for _ in sessions] for _ in range(args.steps)]
        began = time.perf_counter()
        round_of(backend, sessions, xs[0], 16)  # records the round
        record_s = time.perf_counter() - began
        times, outputs = [], []
        for i, x in enumerate(xs[1:], start=17):
            began = time.perf_counter()
            outputs.extend(round_of(backend, sessions, x, i))
            times.append(time.perf_counter() - began)
        times.sort()
        step_ms = times[len(times) // 2] * 1e3
        decoder = backend.decode_graphs
        entry = max(decoder._graphs.values(), key=lambda e: e.input.shape[0])  # the round of every session
        replay = replay_time(entry.graph)
        kernels, count, total = kernel_table(entry.graph.replay)
        row = {
            "record_s": record_s,
            "step_ms_median": step_ms,
            "replay_ms": replay * 1e3,
            "rows": args.rows,
            "tok_s": args.rows * 1e3 / step_ms,
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
                # the first timed round (same inputs, caches as each route wrote them): values equal to eager's
                first = len(sessions)
                row["equal_share_first_timed_round"] = sum(
                    (a.float() == b).sum().item() for a, b in zip(outputs[:first], ref[:first])
                ) / sum(b.numel() for b in ref[:first])
        report["routes"][route] = row
        log(
            f"[{route}] {args.rows} session(s): record {record_s:.2f}s, step {step_ms:.2f} ms "
            f"({args.rows * 1e3 / step_ms:.1f} tok/s), replay "
            f"{replay * 1e3:.2f} ms ({weight_bytes / replay / 1e9:.0f} GB/s of weights), {count} kernels "
            f"({total / 1e3:.2f} ms of kernel time)"
            + (
                f", max diff vs eager {row['max_diff_vs_eager']:.3g} (outputs up to {row['max_abs_eager']:.3g}), "
                f"{row['equal_share_first_timed_round']:.1%} of the first timed round's values equal to eager's"
                if "max_diff_vs_eager" in row
                else ""
            )
        )
        for k in kernels[:12]:
            log(f"    {k['us_per_round']:8.1f} us  x{k['per_round']:5.0f}  {k['kernel']}")
        del backend, runner, sessions, decoder, entry
        torch.cuda.empty_cache()
    report.pop("reference_outputs", None)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
