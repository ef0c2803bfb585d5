"""The GPU run: a Llama-2-7B-shaped model (random float16 weights) split over 2 nodes on one GPU.

Measures, in one run on one GPU:
  1. single-session greedy decode (16-token prompt, 64 new tokens) through local transformers ``generate()``;
  2. the same through Nectar: 2 node processes (blocks 0:16 and 16:32) on that GPU, the client's embeddings and LM
     head on that GPU too (as a GPU client would run them);
  3. aggregate decode tokens/s of 1 and 16 concurrent sessions through the same 2-node route, one client process
     per session, up to 16 (separate users; one process's GIL would otherwise be the bottleneck, see
     bench_concurrency.py);
  4. the same on one node hosting all 32 blocks (the issue's "16 concurrent sessions on one node");
  5. transformers alone with a static cache (which ``generate()`` compiles on a GPU) at batch 1 and 16: what a user
     has without any swarm, and what 16 sessions on one node are compared with.
Runs unattended and prints every figure (see benchmarks/gpu/run_gpu.sh for the device command).

With ``--quant nf4`` the nodes serve a random pre-quantized nf4 checkpoint (``prequantized.py``: the Llama-2-70B run
of benchmarks/gpu/run_70b.sh, whose float checkpoint would not fit the disk) and the run also reports the weights'
bandwidth floor: the bytes one decode step reads (every block's nf4 codes and scales plus the LM head) over the GPU's
measured copy bandwidth, and the share of that ceiling each figure reaches.

    python benchmarks/bench_gpu.py --model llama2-7b --device cuda --dtype float16
    python benchmarks/bench_gpu.py --model llama2-70b --quant nf4 --no-local --no-one-node
"""

from __future__ import annotations

import argparse
import gc
import logging
import time

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch
from bench_concurrency import (
    compute_counters,
    concurrency_rows,
    counters_since,
    node_time,
    run_load,
    run_sessions,
)
from bench_decode import local_decode, swarm_decode
from common import (
    NEW_TOKENS,
    agreeing_tokens,
    base_parser,
    best,
    checkpoint,
    distributed_model,
    emit,
    even_spans,
    local_swarm,
    log,
    median_timing,
    prompt_ids,
    set_threads,
)
from prequantized import copy_bandwidth, nf4_checkpoint, weight_bytes

logger = logging.getLogger(__name__)


def head_on(model, device: str):
    """Keeps the client's embeddings and LM head on ``device``; logits come back to the CPU for the sampler."""
    head = model.head.to(device)
    logits = head.logits
    head.logits = lambda hidden: logits(hidden).float().cpu()
    return model


def free_device_memory(device: str) -> None:
    """Returns a finished baseline's memory before the next side loads (the nodes need the GPU's memory)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def static_compiled_decode(path, *, batches: list[int], dtype, device: str, repeats: int) -> dict:
    """transformers alone with a static cache, the baseline a user has without any swarm: ``generate()`` compiles
    the forward itself for a static cache on a GPU (eager on a CPU). Decode tokens/s per batch size from two timed
    generations, ``NEW_TOKENS`` and 1 new token (their difference leaves the prefill and the compile out)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.cache_implementation = "static"
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed_generate(input_ids, new_tokens: int) -> tuple[float, torch.Tensor]:
        sync()
        began = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
        return time.perf_counter() - began, out

    results = {}
    with torch.inference_mode():
        for batch in batches:
            input_ids = prompt_ids(batch).to(device)
            began = time.perf_counter()
            for _ in range(2):  # the first compiles (a minute or so for 7B on an H100), the second settles
                timed_generate(input_ids, NEW_TOKENS)
            log(f"  static cache, batch {batch}: warmed up in {time.perf_counter() - began:.0f}s")
            rates, tokens = [], None
            for _ in range(repeats):
                whole, tokens = timed_generate(input_ids, NEW_TOKENS)
                first, _ = timed_generate(input_ids, 1)
                rates.append(batch * (NEW_TOKENS - 1) / max(whole - first, 1e-9))
            results[batch] = {
                "aggregate_tps": max(rates),
                "runs_tps": rates,
                "tokens": tokens[:, -NEW_TOKENS:].tolist(),
            }
            log(f"  static cache, batch {batch}: {max(rates):.1f} tok/s")
    return results  # the model goes with this frame; main() frees its memory before the nodes start


def concurrent_sessions(model, path, swarm, args) -> dict:
    """Aggregate tokens/s of each count of concurrent sessions through ``swarm``."""
    run_sessions(model, 2, steps=4)  # warm-up of the batched path
    results = {}
    before = compute_counters(model) if len(swarm.nodes) == 1 else {}
    for num_sessions in args.sessions:
        result = run_load(model, path, swarm, num_sessions, args)
        if len(swarm.nodes) == 1:  # the node's own counters: how many steps shared a forward, how many replayed
            counters = compute_counters(model)
            result.update(counters_since(before, counters))
            before = counters
        # a count named twice (``--sessions 1 16 16``: the second run finds its recordings made) keeps its best run
        earlier = results.get(num_sessions)
        result["runs_tps"] = (earlier["runs_tps"] if earlier else []) + [result["aggregate_tps"]]
        if earlier is None or result["aggregate_tps"] >= earlier["aggregate_tps"]:
            results[num_sessions] = result
        else:
            earlier["runs_tps"] = result["runs_tps"]
        log(
            f"  {num_sessions} sessions: {result['aggregate_tps']:.1f} tok/s"
            + (node_time(result) if len(swarm.nodes) == 1 else "")
        )
    return results


def sessions_on_one_node(path, num_blocks: int, args) -> dict:
    log(f"Nectar: 1 node (0, {num_blocks}) on {args.device}, concurrent sessions")
    with local_swarm(
        path,
        [(0, num_blocks)],
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        extra_args=["--cache-mb", args.cache_mb, *args.node_args.split()],
    ) as swarm:
        model = head_on(
            distributed_model(path, swarm, dtype=getattr(torch, args.dtype), receipts_ride=args.receipts_ride),
            args.device,
        )
        try:
            return concurrent_sessions(model, path, swarm, args)
        finally:
            model.shutdown()


def bandwidth_floor(path, device: str) -> dict:
    """The weights' bandwidth floor of one decode step: every block's weights (nf4 codes and scales, or floats) and
    the LM head are read once per step; ``ceiling_tps`` = copy bandwidth / those bytes (NaN off a GPU). Sessions
    computed one at a time (the generic path) share that ceiling; a batched step would serve several at once."""
    sizes = weight_bytes(path)
    step = sizes["blocks"] + sizes["head"]
    bandwidth = copy_bandwidth(device)
    return {
        "block_bytes": sizes["blocks"],
        "head_bytes": sizes["head"],
        "step_bytes": step,
        "bandwidth": bandwidth,
        "floor_ms": step / bandwidth * 1e3,
        "ceiling_tps": bandwidth / step,
    }


def _agreement(agreeing: int, suffix: str = "") -> dict:
    """Whether two greedy runs of NEW_TOKENS agree, and for how many tokens before they part."""
    return {f"same_tokens{suffix}": agreeing == NEW_TOKENS, f"tokens_agreeing{suffix}": agreeing}


def main() -> None:
    parser = base_parser(__doc__, results_group="gpu")
    parser.set_defaults(model="llama2-7b", threads=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--node-args", default="", help="extra arguments for every node (quoted)")
    parser.add_argument(
        "--quant",
        choices=["none", "nf4"],
        default="none",
        help="nf4: serve a random pre-quantized nf4 checkpoint (built on --device by prequantized.py)",
    )
    parser.add_argument("--cache-mb", default="16384", help="each node's attention cache budget")
    parser.add_argument(
        "--local",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure local transformers generate() (the ratio's baseline)",
    )
    parser.add_argument(
        "--one-node",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the concurrent sessions on one node hosting every block",
    )
    parser.add_argument("--one-node-only", action="store_true", help="only the concurrent sessions on one node")
    parser.add_argument(
        "--static-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure transformers with a static (compiled on GPUs) cache at batch 1 and the largest --sessions",
    )
    parser.add_argument(
        "--push",
        action="store_true",
        help="with --nodes > 1, also a client whose nodes push each step's output to the next node (ClientConfig.push),"
        " its single-session runs alternating with the relaying client's",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=16,
        help="load-generating client processes for the concurrent sessions (0 = threads of this one)",
    )
    parser.add_argument(
        "--receipts-ride",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clients let a node send each receipt in the next step's answer where its round serves other sessions"
        " (ClientConfig.receipts_ride); --no-receipts-ride: every receipt alone, as before stop 46",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    began = time.perf_counter()
    if args.quant == "nf4":
        path = nf4_checkpoint(args.model, device=args.device)
        args.node_args = f"--quant nf4 {args.node_args}"
    else:
        path = checkpoint(args.model, dtype=args.dtype, device=args.device)
    log(f"checkpoint ready in {time.perf_counter() - began:.0f}s: {path}")
    num_blocks = common.llama_config(args.model).num_hidden_layers

    if args.one_node_only:
        results = sessions_on_one_node(path, num_blocks, args)
        emit(
            f"GPU: {args.model} {args.dtype}, concurrent sessions on one node",
            concurrency_rows(results),
            {"concurrency_one_node": results},
            args.json,
        )
        return
    local = local_tokens = local_best = None
    if args.local:
        log("local transformers generate()")
        local, local_tokens = local_decode(path, repeats=args.repeats, dtype=dtype, device=args.device)
        free_device_memory(args.device)
        local_best = best(local)
    static = {}
    if args.static_baseline and args.quant != "nf4":  # transformers' static cache reads float weights
        log("local transformers, static cache")
        static = static_compiled_decode(
            path, batches=sorted({1, max(args.sessions)}), dtype=dtype, device=args.device, repeats=args.repeats
        )
        free_device_memory(args.device)

    spans = even_spans(num_blocks, args.nodes)
    log(f"Nectar: {args.nodes} nodes {spans} on {args.device}")
    concurrency = {}
    with local_swarm(
        path,
        spans,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        extra_args=["--cache-mb", args.cache_mb, *args.node_args.split()],
    ) as swarm:
        model = head_on(distributed_model(path, swarm, dtype=dtype, receipts_ride=args.receipts_ride), args.device)
        pushing = None
        if args.push and args.nodes > 1:
            pushing = head_on(
                distributed_model(path, swarm, dtype=dtype, push=True, receipts_ride=args.receipts_ride), args.device
            )
        try:
            for client in (model, pushing) if pushing is not None else (model,):
                client.generate(prompt_ids(), max_new_tokens=4, do_sample=False, eos_token_id=[])
            log("single-session decode" + (", relaying and pushing clients alternating" if pushing else ""))
            runs, push_runs, tokens, push_same = [], [], None, True
            for _ in range(args.repeats):  # alternating, so both sides see the same machine
                timings, tokens = swarm_decode(model, repeats=1)
                runs += timings
                if pushing is not None:
                    timings, pushed = swarm_decode(pushing, repeats=1)
                    push_runs += timings
                    push_same &= pushed.tolist() == tokens.tolist()  # in every run
            log(f"  {best(runs).decode_tps:.1f} tok/s; concurrent sessions {args.sessions}")
            if push_runs:
                log(f"  push: {best(push_runs).decode_tps:.1f} tok/s, same tokens: {push_same}")
            concurrency = concurrent_sessions(model, path, swarm, args)
        finally:
            model.shutdown()
            if pushing is not None:
                pushing.shutdown()
    one_node = sessions_on_one_node(path, num_blocks, args) if args.one_node else {}
    top = best(runs)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    figures = {
        "model": args.model,
        "device": gpu,
        "dtype": args.dtype,
        "quant": args.quant,
        "nodes": args.nodes,
        "nectar": {
            "decode_tps": top.decode_tps,
            "median_ms": top.median_ms,
            "median_run_tps": median_timing(runs).decode_tps,
            "runs_tps": [t.decode_tps for t in runs],
        },
        "concurrency": concurrency,
        "concurrency_one_node": one_node,
        "static_cache": {
            str(b): {
                **{k: v for k, v in r.items() if k != "tokens"},
                **(
                    _agreement(agreeing_tokens(r["tokens"][0], local_tokens[0, -NEW_TOKENS:].tolist()), "_as_local")
                    if local_tokens is not None
                    else {}
                ),
            }
            for b, r in static.items()
        },
    }
    rows = []
    versus = ""
    if local_best is not None:
        ratio = top.decode_tps / local_best.decode_tps
        overhead = top.median_ms - local_best.median_ms
        figures["local"] = {
            "decode_tps": local_best.decode_tps,
            "median_ms": local_best.median_ms,
            "runs_tps": [t.decode_tps for t in local],
        }
        figures["nectar"] |= {
            "ratio": ratio,
            "overhead_ms": overhead,
            **_agreement(agreeing_tokens(tokens[0, -NEW_TOKENS:].tolist(), local_tokens[0, -NEW_TOKENS:].tolist())),
        }
        rows.append(
            ("local transformers", f"{local_best.decode_tps:8.1f} tok/s  median {local_best.median_ms:6.2f} ms/token")
        )
        versus = f"  {ratio:5.2f}x local  overhead {overhead:+.2f} ms/token"
    rows.append(
        (f"nectar, {args.nodes} nodes", f"{top.decode_tps:8.1f} tok/s  median {top.median_ms:6.2f} ms/token{versus}")
    )
    if push_runs:
        pushed_top = best(push_runs)
        figures["push"] = {
            "decode_tps": pushed_top.decode_tps,
            "median_ms": pushed_top.median_ms,
            "runs_tps": [t.decode_tps for t in push_runs],
            "vs_relay": pushed_top.decode_tps / top.decode_tps,
            "same_tokens_as_relay": push_same,
        }
        rows.append(
            (
                f"nectar, {args.nodes} nodes, push",
                f"{pushed_top.decode_tps:8.1f} tok/s  median {pushed_top.median_ms:6.2f} ms/token  "
                f"{figures['push']['vs_relay']:5.2f}x relaying, same tokens: {push_same}",
            )
        )
    if local_best is not None:
        nectar = figures["nectar"]
        agreed = f"{nectar['same_tokens']} ({nectar['tokens_agreeing']} of {NEW_TOKENS} new tokens agree first)"
        rows.append(("same greedy tokens", agreed))
    figures["floor"] = floor = bandwidth_floor(path, args.device)
    ceiling = "no bandwidth measured off a GPU"
    if floor["ceiling_tps"] == floor["ceiling_tps"]:  # not NaN
        ceiling = (
            f"copy bandwidth {floor['bandwidth'] / 1e9:.0f} GB/s: floor {floor['floor_ms']:.2f} ms, "
            f"ceiling {floor['ceiling_tps']:.1f} tok/s per step"
        )
    rows.append(
        (
            "weights per decode step",
            f"{floor['step_bytes'] / 1e9:.2f} GB (blocks {floor['block_bytes'] / 1e9:.2f} + head "
            f"{floor['head_bytes'] / 1e9:.2f}); {ceiling}",
        )
    )
    if floor["ceiling_tps"] == floor["ceiling_tps"]:  # not NaN (a CPU run measures no bandwidth)
        shares = {"single session": top.decode_tps}
        shares |= {f"{n} sessions (aggregate)": r["aggregate_tps"] for n, r in concurrency.items()}
        floor["share"] = {name: tps / floor["ceiling_tps"] for name, tps in shares.items()}
        rows += [(f"share of the ceiling, {name}", f"{share:6.1%}") for name, share in floor["share"].items()]
    for batch, result in static.items():
        rows.append((f"transformers static cache, batch {batch}", f"{result['aggregate_tps']:8.1f} tok/s"))
    if static and one_node and max(static) in one_node:  # the comparison: 16 sessions on one node
        largest = max(static)
        figures["one_node_vs_static"] = one_node[largest]["aggregate_tps"] / static[largest]["aggregate_tps"]
        rows.append(
            (f"{largest} sessions on 1 node / static batch {largest}", f"{figures['one_node_vs_static']:5.2f}x")
        )
    for where, results in ((f"{args.nodes} nodes", concurrency), ("1 node", one_node)):
        rows += concurrency_rows(results, f"concurrent session(s), {where}") if results else []
    emit(
        f"GPU: {args.model} {args.dtype}{'+nf4' if args.quant == 'nf4' else ''} on {gpu}, {args.nodes} nodes on one "
        "device, 16+64 tokens",
        rows,
        figures,
        args.json,
    )


if __name__ == "__main__":
    main()
