"""Nectar vs Petals 2.2.0.post1 on the same checkpoint: single-session decode and prompt-tuning steps/s, 2 nodes.

Petals runs in its own virtual environment (benchmarks/petals/setup_venv.sh, created on first use) with its own
processes: a bootstrap DHT and one server per span (``--block_indices``, ``--dht_prefix``, ``--throughput 1``, float32
on CPU, the same torch threads and OpenMP wait policy as Nectar's nodes). One swarm runs at a time (Petals first, its
client in a child process of its environment; then Nectar's swarm and client in this one), and each side's best run
counts. Local transformers (5.x here, 4.34.1 in the Petals environment) is measured in both for reference.

    python benchmarks/bench_petals.py --model tiny
"""
from __future__ import annotations

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from bench_decode import local_in_child, swarm_decode
from bench_training import SwarmRunner
from common import (
    NUM_LAYERS, DecodeTiming, base_parser, best, checkpoint, distributed_model, emit, even_spans, local_swarm, log,
    node_env, prompt_ids, set_threads, timed,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path(os.environ.get("PETALS_VENV", Path.home() / ".cache" / "nectar-bench" / "petals-venv"))


def ensure_venv(venv: Path) -> Path:
    subprocess.run(["bash", str(HERE / "petals" / "setup_venv.sh"), str(venv)], check=True)
    return venv / "bin" / "python"


@contextmanager
def petals_process(python: Path, args: list[str], *, name: str, env: dict, workdir: Path, wait_for: str = ""):
    """Starts ``run_petals.py <args>`` in its own process group; yields (process, first line matching wait_for)."""
    log_path = workdir / f"{name}.log"
    log_file = open(log_path, "w")
    process = subprocess.Popen([str(python), str(HERE / "petals" / "run_petals.py"), *args], stdout=subprocess.PIPE,
                               stderr=log_file, text=True, env=env, start_new_session=True)
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            if wait_for and wait_for in line and not found:
                found.append(line.strip())
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if wait_for and (not ready.wait(120) or not found):
            raise RuntimeError(f"Petals {name} did not start; see {log_path}")
        yield process, (found[0] if found else "")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the Petals virtual environment")
    parser.add_argument("--nodes", type=int, default=2, help="servers in each swarm")
    parser.add_argument("--no-tuning", action="store_true", help="skip prompt tuning (decode only)")
    parser.add_argument("--push", action="store_true", help="Nectar's client with server-to-server push")
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    python = ensure_venv(args.venv)
    spans = even_spans(NUM_LAYERS, args.nodes)
    prefix = f"nectar-bench-{args.model}"
    env = {**os.environ, **node_env(args.threads), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    workdir = Path(tempfile.mkdtemp(prefix="petals-bench-"))
    figures: dict = {"model": args.model, "threads": args.threads, "nodes": args.nodes, "push": args.push}

    # one swarm at a time: idle servers of one system must not take CPU from the other's measurements
    with ExitStack() as stack:
        _, address = stack.enter_context(
            petals_process(python, ["dht"], name="dht", env=env, workdir=workdir, wait_for="/p2p/"))
        for i, (start, end) in enumerate(spans):
            stack.enter_context(petals_process(
                python, ["server", "--", str(path), "--block_indices", f"{start}:{end}", "--initial_peers", address,
                         "--dht_prefix", prefix, "--throughput", "1", "--torch_dtype", "float32", "--device", "cpu",
                         "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--identity_path", str(workdir / f"id{i}.key")],
                name=f"server{i}", env=env, workdir=workdir))
        log(f"Petals: DHT at {address}, {args.nodes} servers loading {spans} (logs in {workdir})")
        out = subprocess.run([str(python), str(HERE / "petals" / "run_petals.py"), "bench", "--model", str(path),
                              "--peers", address, "--prefix", prefix, "--threads", str(args.threads),
                              "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"Petals client failed:\n{out.stderr[-3000:]}")
        petals = json.loads(out.stdout.strip().splitlines()[-1])
    log("Nectar swarm and client measurements")
    with local_swarm(path, spans, threads=args.threads) as swarm:
        model = distributed_model(path, swarm, push=args.push)
        try:
            model.generate(prompt_ids(), max_new_tokens=4, do_sample=False, eos_token_id=[])
            nectar_runs, nectar_tokens = swarm_decode(model, repeats=args.repeats)
        finally:
            model.shutdown()
        tune_s = None
        if not args.no_tuning:
            runner = SwarmRunner(path, swarm)
            try:
                tune_s = min(timed(runner.tune_step, 1) for _ in range(args.repeats))
            finally:
                runner.close()
    local_runs, local_tokens = local_in_child(args.model, threads=args.threads, repeats=args.repeats,
                                              policy="PASSIVE")

    petals_runs = [DecodeTiming(t["first"], t["gaps"]) for t in petals["petals_decode"]]
    petals_local = [DecodeTiming(t["first"], t["gaps"]) for t in petals["local_decode"]]
    ours, theirs, here, there = best(nectar_runs), best(petals_runs), best(local_runs), best(petals_local)
    figures.update(
        nectar={"decode_tps": ours.decode_tps, "median_ms": ours.median_ms, "tune_steps_s": 1 / tune_s if tune_s else None},
        petals={"decode_tps": theirs.decode_tps, "median_ms": theirs.median_ms,
                "tune_steps_s": 1 / min(petals["petals_tune_s"]) if petals.get("petals_tune_s") else None},
        local_transformers5={"decode_tps": here.decode_tps}, local_transformers434={"decode_tps": there.decode_tps},
        same_tokens={"nectar_vs_petals": nectar_tokens.tolist() == petals["petals_tokens"],
                     "nectar_vs_local": nectar_tokens.tolist() == local_tokens.tolist()},
    )
    figures["decode_ratio"] = ours.decode_tps / theirs.decode_tps
    # the two swarms run one after the other: each over the local transformers of its own phase cancels a machine
    # that got slower or faster in between
    figures["decode_ratio_vs_phase_local"] = ((ours.decode_tps / here.decode_tps)
                                              / (theirs.decode_tps / there.decode_tps))
    rows = [
        ("nectar decode", f"{ours.decode_tps:8.1f} tok/s  median {ours.median_ms:6.2f} ms/token"),
        ("petals decode", f"{theirs.decode_tps:8.1f} tok/s  median {theirs.median_ms:6.2f} ms/token"),
        ("nectar / petals", f"{figures['decode_ratio']:8.2f}x decode; each over its phase's local transformers: "
                            f"{ours.decode_tps / here.decode_tps:.2f}x / {theirs.decode_tps / there.decode_tps:.2f}x = "
                            f"{figures['decode_ratio_vs_phase_local']:.2f}x"),
        ("local transformers", f"{here.decode_tps:8.1f} tok/s ({petals['versions']['transformers']} in Petals' env: "
                               f"{there.decode_tps:.1f} tok/s)"),
        ("same greedy tokens", f"nectar = petals: {figures['same_tokens']['nectar_vs_petals']}, "
                               f"nectar = local: {figures['same_tokens']['nectar_vs_local']}"),
    ]
    if figures["nectar"]["tune_steps_s"] and figures["petals"]["tune_steps_s"]:
        figures["tune_ratio"] = figures["nectar"]["tune_steps_s"] / figures["petals"]["tune_steps_s"]
        rows.append(("prompt tuning", f"nectar {figures['nectar']['tune_steps_s']:.3f} steps/s, petals "
                                      f"{figures['petals']['tune_steps_s']:.3f} steps/s: {figures['tune_ratio']:.2f}x"))
    emit(f"Nectar vs Petals 2.2.0.post1, {args.model}, {args.nodes} nodes, float32 CPU, {args.threads} thread(s)",
         rows, figures, args.json)


if __name__ == "__main__":
    main()
