"""Single-session greedy decode: Nectar through 1, 2 and 3 nodes vs local transformers ``generate()``.

Same checkpoint, dtype (float32), device (CPU) and torch threads everywhere; 16-token prompt, 64 new tokens.
Decode tokens/s counts the 63 gaps between new tokens (the first token is prefill). The per-token overhead of a route
is its median gap minus the local median gap.

Local runs happen in a child process, alternately with OpenMP's default wait policy and with PASSIVE (what nodes use),
and each is followed by a Nectar run, so both sides get the same number of runs under the same load. On a shared
machine, each side's best run is compared (the medians of the runs are printed too).

With ``--push``, a second client on the same swarm runs with server-to-server push (``ClientConfig.push``) and
its runs are interleaved with the relay client's and the local ones: local, relay, push, local, relay, push, ...

    python benchmarks/bench_decode.py --model tiny --nodes 1 2 3 --threads 1 [--push]
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch
from common import (
    NEW_TOKENS,
    NUM_LAYERS,
    DecodeTiming,
    TokenClock,
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

logger = logging.getLogger(__name__)


def local_decode(path, *, repeats: int, dtype=torch.float32, device: str = "cpu"):
    """transformers ``generate()`` in this process: (timings, tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    input_ids = prompt_ids().to(device)
    timings, tokens = [], None
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            clock = TokenClock()
            tokens = model.generate(
                input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock
            )
            timings.append(DecodeTiming.from_clock(clock))
    return timings, tokens.cpu()


def local_in_child(model: str, *, threads: int, repeats: int, policy: str):
    """Runs ``local_decode`` in a fresh process with OMP_WAIT_POLICY=policy ("" = OpenMP's default)."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    else:
        env["OMP_WAIT_POLICY"] = ""  # common.py keeps an explicit (empty) choice: the library default
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--local-worker",
            "--model",
            model,
            "--threads",
            str(threads),
            "--repeats",
            str(repeats),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return [DecodeTiming(t["first"], t["gaps"]) for t in data["timings"]], torch.tensor(data["tokens"])


def swarm_decode(model, *, repeats: int):
    input_ids = prompt_ids()
    timings, tokens = [], None
    for _ in range(repeats):
        clock = TokenClock()
        tokens = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], streamer=clock)
        timings.append(DecodeTiming.from_clock(clock))
    return timings, tokens


def main() -> None:
    parser = base_parser(__doc__, results_group="decode")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], help="route lengths to measure")
    parser.add_argument("--node-args", default="", help="extra arguments for every node (quoted)")
    parser.add_argument("--push", action="store_true", help="also measure server-to-server push, interleaved")
    parser.add_argument("--local-worker", action="store_true", help=argparse_hidden())
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    if args.local_worker:
        timings, tokens = local_decode(path, repeats=args.repeats)
        print(
            json.dumps(
                {"timings": [{"first": t.first_token_s, "gaps": t.gaps_s} for t in timings], "tokens": tokens.tolist()}
            )
        )
        return

    local_runs, local_tokens, policies = [], None, {}
    figures = {"model": args.model, "threads": args.threads}
    results = {}
    for num_nodes in args.nodes:
        spans = even_spans(NUM_LAYERS, num_nodes)
        log(f"{num_nodes} node(s): spans {spans}")
        with local_swarm(path, spans, threads=args.threads, extra_args=args.node_args.split()) as swarm:
            modes = ["relay"] + (["push"] if args.push and num_nodes > 1 else [])
            models = {}
            try:
                for mode in modes:
                    models[mode] = distributed_model(path, swarm, push=mode == "push")
                    models[mode].generate(prompt_ids(), max_new_tokens=4, do_sample=False, eos_token_id=[])  # warm-up
                runs, tokens, paired = {mode: [] for mode in modes}, {}, []
                for repeat in range(args.repeats):  # alternate: the machine's load hits every side alike
                    for policy in ("", "PASSIVE"):  # each local run is followed by one run per mode: equal samples
                        timings, local_tokens = local_in_child(
                            args.model, threads=args.threads, repeats=1, policy=policy
                        )
                        local_runs += timings
                        paired += timings
                        policies.setdefault(policy or "default", []).extend(timings)
                        measured = []
                        for mode in modes:
                            timings, tokens[mode] = swarm_decode(models[mode], repeats=1)
                            runs[mode] += timings
                            measured.append(f"{mode} {timings[0].decode_tps:.1f}")
                        log(
                            f"  repeat {repeat}: local ({policy or 'default'}) {local_runs[-1].decode_tps:.1f} tok/s, "
                            f"nectar {', '.join(measured)} tok/s"
                        )
            finally:
                for model in models.values():
                    model.shutdown()
        for mode in modes:
            results[(num_nodes, mode)] = (runs[mode], tokens[mode], paired)

    local_best = best(local_runs)
    figures["local"] = {
        "decode_tps": local_best.decode_tps,
        "median_ms": local_best.median_ms,
        "by_wait_policy_tps": {p: best(t).decode_tps for p, t in policies.items()},
    }
    rows = [
        (
            "local transformers",
            f"{local_best.decode_tps:8.1f} tok/s  median {local_best.median_ms:6.2f} ms/token"
            f"  (best of {len(local_runs)}; OpenMP default {best(policies['default']).decode_tps:.1f}, "
            f"PASSIVE {best(policies['PASSIVE']).decode_tps:.1f})",
        )
    ]
    for (num_nodes, mode), (runs, tokens, paired) in results.items():
        top, local_top = best(runs), best(paired)  # against the local runs interleaved with these
        ratio = top.decode_tps / local_top.decode_tps
        overhead = top.median_ms - local_top.median_ms
        median_ratio = median_timing(runs).decode_tps / median_timing(paired).decode_tps
        same = tokens.tolist() == local_tokens.tolist()
        key = f"nodes{num_nodes}" + ("_push" if mode == "push" else "")
        figures[key] = {
            "decode_tps": top.decode_tps,
            "median_ms": top.median_ms,
            "ratio": ratio,
            "overhead_ms": overhead,
            "same_tokens": same,
            "median_run_ratio": median_ratio,
            "paired_local_tps": local_top.decode_tps,
            "runs_tps": [t.decode_tps for t in runs],
            "paired_local_runs_tps": [t.decode_tps for t in paired],
        }
        rows.append(
            (
                f"nectar, {num_nodes} node(s)" + (", push" if mode == "push" else ""),
                f"{top.decode_tps:8.1f} tok/s  median {top.median_ms:6.2f} ms/token  {ratio:5.2f}x local "
                f"({local_top.decode_tps:.1f} tok/s in the same runs)  overhead {overhead:+.2f} ms/token  "
                f"median-run ratio {median_ratio:.2f}x  same tokens: {'yes' if same else 'NO'}",
            )
        )
    emit(
        f"Single-session decode, {args.model}, float32 CPU, {args.threads} thread(s), 16+64 tokens",
        rows,
        figures,
        args.json,
    )


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
