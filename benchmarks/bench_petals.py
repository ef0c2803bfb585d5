"""Nectar vs Petals 2.2.0.post1 on the same checkpoint: single-session decode and prompt-tuning steps/s, 2 nodes.

Petals runs in its own virtual environment (benchmarks/petals/setup_venv.sh, created on first use) with its own
processes: a bootstrap DHT and one server per span (``--block_indices``, ``--dht_prefix``, ``--throughput 1``, float32
on CPU, the same torch threads and OpenMP wait policy as Nectar's nodes), and its client in a child process of that
environment (``run_petals.py client``). Both swarms stay up and their runs alternate (Petals, Nectar, Nectar, Petals,
...), so a machine that drifts between faster and slower spells weighs on both alike; each side's best run counts.
The idle swarm's CPU time during the other's runs is printed too (its share of the wall time). Prompt-tuning steps
alternate the same way. Local transformers (5.x here, 4.34.1 in the Petals environment) is measured for reference.

On a GPU (``--device cuda --dtype float16``): Petals' servers run with ``--torch_dtype float16 --device cuda
--quant_type none`` and Nectar's nodes with ``--device cuda --dtype float16``, all on the one GPU, each side's client
keeping its embeddings and LM head there too. ``--nodes 1 2`` measures a 1-server and a 2-server swarm of each, one
after the other (only one pair of swarms holds the GPU at a time). ``--sessions 1 16`` adds the aggregate decode
tokens/s of that many concurrent inference sessions, each from its own thread of one client process on both sides
(Nectar: bench_concurrency.run_sessions; Petals: run_petals.py's ``sessions``), sending hidden states: a 16-token
prefill, then ``--session-steps`` single-token steps, the same seeded inputs on both; their runs alternate too.

    python benchmarks/bench_petals.py --model tiny
    python benchmarks/bench_petals.py --model llama2-7b --device cuda --dtype float16 --nodes 1 2 --sessions 1 16 \
        --no-tuning --no-local     # benchmarks/gpu/run_petals_gpu.sh
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import psutil
from bench_concurrency import _summary, concurrency_rows, run_sessions
from bench_decode import local_in_child, swarm_decode
from bench_training import SwarmRunner
from common import (
    NEW_TOKENS,
    DecodeTiming,
    base_parser,
    best,
    checkpoint,
    distributed_model,
    emit,
    even_spans,
    llama_config,
    local_swarm,
    log,
    node_env,
    prompt_ids,
    set_threads,
    timed,
    with_session_cap,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path(os.environ.get("PETALS_VENV", Path.home() / ".cache" / "nectar-bench" / "petals-venv"))


def ensure_venv(venv: Path) -> Path:
    subprocess.run(["bash", str(HERE / "petals" / "setup_venv.sh"), str(venv)], check=True)
    return venv / "bin" / "python"


def start_petals(python: Path, args: list[str], *, log_path: Path, env: dict, stdin=None) -> subprocess.Popen:
    """``run_petals.py <args>`` in its own process group (so ``stop_petals`` ends its children too), stderr to
    ``log_path``, stdout read by the caller."""
    return subprocess.Popen(
        [str(python), str(HERE / "petals" / "run_petals.py"), *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=open(log_path, "w"),
        text=True,
        env=env,
        start_new_session=True,
    )


def stop_petals(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


@contextmanager
def petals_process(python: Path, args: list[str], *, name: str, env: dict, workdir: Path, wait_for: str = ""):
    """Starts ``run_petals.py <args>``; yields (process, first line matching wait_for)."""
    log_path = workdir / f"{name}.log"
    process = start_petals(python, args, log_path=log_path, env=env)
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
        stop_petals(process)


class PetalsClient:
    """``run_petals.py client`` in the Petals environment: one JSON request line in, one JSON answer line out."""

    def __init__(self, python: Path, args: list[str], *, env: dict, workdir: Path, timeout: float = 900):
        self.log_path = workdir / "client.log"
        self.process = start_petals(python, ["client", *args], log_path=self.log_path, env=env, stdin=subprocess.PIPE)
        self.ready = self._answer(timeout)

    def ask(self, request: dict, timeout: float = 900) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer(timeout)

    def _answer(self, timeout: float) -> dict:
        lines: list[str] = []

        def read() -> None:  # the answer is the next JSON line; anything a library printed is skipped
            for line in self.process.stdout:
                if line.startswith("{"):
                    lines.append(line)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not lines:
            raise RuntimeError(f"the Petals client gave no answer; see {self.log_path}")
        answer = json.loads(lines[0])
        if "error" in answer:
            raise RuntimeError(f"the Petals client: {answer['error']}")
        return answer

    def close(self) -> None:
        stop_petals(self.process)


def wait_for_servers(logs: list[Path], processes: list[subprocess.Popen], timeout: float = 600) -> None:
    """Until every Petals server logs "Started" (its blocks loaded and announced): a client that asks earlier backs
    off for up to a minute between its retries."""
    deadline = time.monotonic() + timeout
    while not all("[INFO] Started" in path.read_text(errors="replace") for path in logs):
        for path, process in zip(logs, processes):
            if process.poll() is not None:
                raise RuntimeError(f"a Petals server exited with status {process.returncode}; see {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Petals servers did not start in {timeout:.0f} s; see {logs}")
        time.sleep(1)


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes and all their descendants (p2pd daemons included)."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def alternate(
    sides: dict[str, Callable[[], object]], idle_pids: dict[str, list[int]], rounds: int
) -> tuple[dict[str, list], dict[str, float]]:
    """Runs each side once per round, the order flipping every round; returns each side's results and the largest
    share of a run's wall time that the other side's idle processes spent on the CPU during it."""
    names = list(sides)
    results: dict[str, list] = {name: [] for name in names}
    idle_share = {name: 0.0 for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            others = [pid for other, pids in idle_pids.items() if other != name for pid in pids]
            cpu_before, began = cpu_seconds(others), time.perf_counter()
            results[name].append(sides[name]())
            share = (cpu_seconds(others) - cpu_before) / (time.perf_counter() - began)
            idle_share[name] = max(idle_share[name], share)
    return results, idle_share


def petals_sessions(petals: PetalsClient, num_sessions: int, steps: int) -> dict:
    report = petals.ask({"sessions": num_sessions, "steps": steps})
    # sessions Petals' client left to its finalizer so far (run_petals.py's _guard_session_finalizer)
    return {**_summary(num_sessions, steps, report["began"], [report]), "unclosed": report["unclosed_sessions"]}


def compare(args, nodes: int, path: Path, python: Path) -> tuple[dict, list]:
    """Both swarms of ``nodes`` servers up together, their runs alternating; returns (figures, rows)."""
    import torch

    on_cpu = args.device == "cpu" and args.dtype == "float32"
    spans = even_spans(llama_config(args.model).num_hidden_layers, nodes)
    prefix = f"nectar-bench-{args.model}-{nodes}"
    env = {**os.environ, **node_env(args.threads), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    workdir = Path(tempfile.mkdtemp(prefix="petals-bench-"))
    figures: dict = {
        "model": args.model,
        "threads": args.threads,
        "nodes": nodes,
        "push": args.push,
        "device": args.device,
        "dtype": args.dtype,
        "protocol": "alternating",
    }

    with ExitStack() as stack:
        servers = []
        dht, address = stack.enter_context(
            petals_process(python, ["dht"], name="dht", env=env, workdir=workdir, wait_for="/p2p/")
        )
        for i, (start, end) in enumerate(spans):
            server, _ = stack.enter_context(
                petals_process(
                    python,
                    [
                        "server",
                        "--",
                        str(path),
                        "--block_indices",
                        f"{start}:{end}",
                        "--initial_peers",
                        address,
                        "--dht_prefix",
                        prefix,
                        "--throughput",
                        "1",
                        "--torch_dtype",
                        args.dtype,
                        "--device",
                        args.device,
                        "--quant_type",
                        "none",  # float16 as Nectar's; bitsandbytes is not installed (fetch_petals_wheels.sh)
                        "--host_maddrs",
                        "/ip4/127.0.0.1/tcp/0",
                        "--identity_path",
                        str(workdir / f"id{i}.key"),
                    ],
                    name=f"server{i}",
                    env=env,
                    workdir=workdir,
                )
            )
            servers.append(server)
        petals_servers = [server.pid for server in servers]
        log(f"Petals: DHT at {address}, {nodes} servers loading {spans} (logs in {workdir})")
        placement = {} if on_cpu else {"device": args.device, "dtype": args.dtype}
        swarm = stack.enter_context(  # while Petals' servers load
            local_swarm(path, spans, threads=args.threads, extra_args=args.node_args.split(), **placement)
        )
        log(f"Nectar: {nodes} nodes {spans} up")
        wait_for_servers([workdir / f"server{i}.log" for i in range(len(spans))], servers)
        client_args = ["--model", str(path), "--peers", address, "--prefix", prefix, "--threads", str(args.threads)]
        client_args += ["--device", args.device, "--dtype", args.dtype] + (["--no-tuning"] if args.no_tuning else [])
        petals = PetalsClient(python, client_args, env=env, workdir=workdir)
        stack.callback(petals.close)
        log("Petals' client is served: the runs alternate")
        model = distributed_model(path, swarm, push=args.push, dtype=getattr(torch, args.dtype))
        stack.callback(model.shutdown)
        if args.device != "cpu":
            from bench_gpu import head_on

            head_on(model, args.device)
        model.generate(prompt_ids(), max_new_tokens=4, do_sample=False, eos_token_id=[])
        idle_pids = {
            "petals": [dht.pid, *petals_servers, petals.process.pid],
            "nectar": [peer.process.pid for peer in [*swarm.nodes, swarm.bootstrap] if peer is not None],
        }

        def petals_decode():
            answer = petals.ask({"decode": 1})
            return DecodeTiming(answer["timings"][0]["first"], answer["timings"][0]["gaps"]), answer["tokens"]

        def nectar_decode():
            runs, tokens = swarm_decode(model, repeats=1)
            return runs[0], tokens.tolist()

        decodes, idle_share = alternate({"nectar": nectar_decode, "petals": petals_decode}, idle_pids, args.repeats)
        for name, runs in decodes.items():
            log(f"{name} decode runs: " + ", ".join(f"{run.decode_tps:.1f}" for run, _ in runs) + " tok/s")
        concurrency = {"nectar": {}, "petals": {}}
        if args.sessions:
            steps = args.session_steps
            run_sessions(model, 2, steps=4)  # warm-up of each side's batched path
            petals_sessions(petals, 2, 4)
            for count in args.sessions:
                runs, _ = alternate(
                    {
                        "nectar": lambda count=count: run_sessions(model, count, steps=steps),
                        "petals": lambda count=count: petals_sessions(petals, count, steps),
                    },
                    idle_pids,
                    args.session_repeats,
                )
                for name, results in runs.items():
                    concurrency[name][count] = max(results, key=lambda r: r["aggregate_tps"])
                    concurrency[name][count]["runs_tps"] = [r["aggregate_tps"] for r in results]
                log(
                    f"  {count} sessions: nectar {concurrency['nectar'][count]['aggregate_tps']:.1f}, petals "
                    f"{concurrency['petals'][count]['aggregate_tps']:.1f} tok/s aggregate (best of "
                    f"{args.session_repeats})"
                )
        tunes = {}
        if not args.no_tuning:
            runner = SwarmRunner(path, swarm)
            stack.callback(runner.close)
            runner.tune_step()  # warm-up
            tunes, _ = alternate(
                {"nectar": lambda: timed(runner.tune_step, 1), "petals": lambda: petals.ask({"tune": 1})["tune_s"][0]},
                idle_pids,
                args.repeats,
            )
        petals_local = None if args.no_local else petals.ask({"local": args.repeats})
    local_runs, local_tokens = (
        (None, None)
        if args.no_local
        else local_in_child(args.model, threads=args.threads, repeats=args.repeats, policy="PASSIVE")
    )

    nectar_tokens, petals_tokens = decodes["nectar"][-1][1], decodes["petals"][-1][1]
    ours, theirs = best([run for run, _ in decodes["nectar"]]), best([run for run, _ in decodes["petals"]])
    figures.update(
        nectar={
            "decode_tps": ours.decode_tps,
            "median_ms": ours.median_ms,
            "runs_tps": [run.decode_tps for run, _ in decodes["nectar"]],
            "tune_steps_s": 1 / min(tunes["nectar"]) if tunes else None,
        },
        petals={
            "decode_tps": theirs.decode_tps,
            "median_ms": theirs.median_ms,
            "runs_tps": [run.decode_tps for run, _ in decodes["petals"]],
            "tune_steps_s": 1 / min(tunes["petals"]) if tunes else None,
        },
        idle_cpu_share={"petals_during_nectar": idle_share["nectar"], "nectar_during_petals": idle_share["petals"]},
        same_tokens={"nectar_vs_petals": nectar_tokens == petals_tokens},
        all_runs_same_tokens=all(tokens == nectar_tokens for side in decodes.values() for _, tokens in side),
    )
    if local_runs is not None:
        here = best(local_runs)
        there = best([DecodeTiming(t["first"], t["gaps"]) for t in petals_local["timings"]])
        figures.update(
            local_transformers5={"decode_tps": here.decode_tps},
            local_transformers434={"decode_tps": there.decode_tps},
        )
        figures["same_tokens"]["nectar_vs_local"] = nectar_tokens == local_tokens.tolist()
    figures["decode_ratio"] = ours.decode_tps / theirs.decode_tps
    figures["median_run_ratio"] = statistics.median(figures["nectar"]["runs_tps"]) / statistics.median(
        figures["petals"]["runs_tps"]
    )
    rows = [
        (
            "nectar decode",
            f"{ours.decode_tps:8.1f} tok/s  median {ours.median_ms:6.2f} ms/token  (runs: "
            + ", ".join(f"{tps:.1f}" for tps in figures["nectar"]["runs_tps"])
            + ")",
        ),
        (
            "petals decode",
            f"{theirs.decode_tps:8.1f} tok/s  median {theirs.median_ms:6.2f} ms/token  (runs: "
            + ", ".join(f"{tps:.1f}" for tps in figures["petals"]["runs_tps"])
            + ")",
        ),
        (
            "nectar / petals",
            f"{figures['decode_ratio']:8.2f}x decode (best runs, alternating); median runs "
            f"{figures['median_run_ratio']:.2f}x",
        ),
        (
            "idle swarm's CPU",
            f"petals during nectar's runs {idle_share['nectar']:.1%} of a core at most, "
            f"nectar during petals' {idle_share['petals']:.1%}",
        ),
        (
            "same greedy tokens",
            ", ".join(f"{k.replace('_vs_', ' = ')}: {v}" for k, v in figures["same_tokens"].items())
            + f", every run alike: {figures['all_runs_same_tokens']}",
        ),
    ]
    if local_runs is not None:
        rows.append(
            (
                "local transformers",
                f"{here.decode_tps:8.1f} tok/s ({petals.ready['versions']['transformers']} in "
                f"Petals' env: {there.decode_tps:.1f} tok/s)",
            )
        )
    if args.sessions:
        figures["concurrency"] = concurrency
        figures["concurrency_ratio"] = {
            count: concurrency["nectar"][count]["aggregate_tps"] / concurrency["petals"][count]["aggregate_tps"]
            for count in args.sessions
        }
        for name in ("nectar", "petals"):
            rows += concurrency_rows(concurrency[name], f"concurrent session(s), {name}")
        rows += [
            (f"{count} sessions nectar / petals", f"{ratio:8.2f}x aggregate (best runs, alternating)")
            for count, ratio in figures["concurrency_ratio"].items()
        ]
    if tunes:
        figures["tune_ratio"] = figures["nectar"]["tune_steps_s"] / figures["petals"]["tune_steps_s"]
        rows.append(
            (
                "prompt tuning",
                f"nectar {figures['nectar']['tune_steps_s']:.3f} steps/s, petals "
                f"{figures['petals']['tune_steps_s']:.3f} steps/s: {figures['tune_ratio']:.2f}x",
            )
        )
    return figures, rows


def main() -> None:
    parser = base_parser(__doc__, results_group="petals")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the Petals virtual environment")
    parser.add_argument("--nodes", type=int, nargs="+", default=[2], help="servers in each swarm (one pair per count)")
    parser.add_argument("--device", default="cpu", help="cuda: servers, nodes and both clients' heads on the GPU")
    parser.add_argument("--dtype", default="float32", help="float16 on a GPU")
    parser.add_argument("--sessions", type=int, nargs="*", default=[], help="concurrent-session counts to measure")
    parser.add_argument("--session-steps", type=int, default=NEW_TOKENS, help="decode steps of each session")
    parser.add_argument("--session-repeats", type=int, default=2, help="alternating runs per session count")
    parser.add_argument("--node-args", default="", help="extra arguments for Nectar's nodes (quoted)")
    parser.add_argument("--no-tuning", action="store_true", help="skip prompt tuning (decode only)")
    parser.add_argument("--no-local", action="store_true", help="skip the local transformers references")
    parser.add_argument("--push", action="store_true", help="Nectar's client with server-to-server push")
    args = parser.parse_args()
    set_threads(args.threads)
    args.node_args = with_session_cap(args.node_args, args.sessions)  # Nectar's sessions: one client, as Petals'
    path = checkpoint(args.model, dtype=args.dtype, device=args.device)
    python = ensure_venv(args.venv)
    results = {nodes: compare(args, nodes, path, python) for nodes in args.nodes}
    if len(results) == 1:  # one swarm size: the figures as before (roofline.py reads them)
        ((nodes, (figures, rows)),) = results.items()
    else:
        figures = {"by_nodes": {nodes: f for nodes, (f, _) in results.items()}}
        rows = [(f"{nodes} node(s): {name}", value) for nodes, (_, r) in results.items() for name, value in r]
    where = "float32 CPU" if args.device == "cpu" else f"{args.dtype} {args.device}"
    emit(
        f"Nectar vs Petals 2.2.0.post1, {args.model}, {'/'.join(map(str, args.nodes))} nodes, {where}, "
        f"{args.threads} thread(s)",
        rows,
        figures,
        args.json,
    )


if __name__ == "__main__":
    main()
