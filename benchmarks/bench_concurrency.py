"""Aggregate decode tokens/s of 1, 4, 16 and 64 concurrent inference sessions on one node (all 8 blocks).

Each session opens its own stream, sends a 16-token prefill, then 64 single-token steps, from its own client thread
(one client process, like a gateway serving many users; or, with ``--client-processes P``, spread over P
processes, like separate users' machines, so the clients' Python work is not serialised by one GIL). Clients send
hidden states (embeddings of random tokens):
the LM head runs on client machines in a real deployment, so the figure is what the node serves. Aggregate tokens/s
counts decode steps of all sessions between the moment every prefill is done and the last session's last step.
The node batches concurrent steps into one forward (the family's batch runner, models/families/llama/batching.py);
its compute counters are printed too.

    python benchmarks/bench_concurrency.py --model tiny --sessions 1 4 16 64
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import threading
import time

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch
from common import (
    NEW_TOKENS,
    PROMPT_TOKENS,
    VOCAB,
    base_parser,
    checkpoint,
    distributed_model,
    emit,
    local_swarm,
    log,
    set_threads,
    with_session_cap,
)

logger = logging.getLogger(__name__)


def _drive(model, indices, steps: int, start) -> dict:
    """Opens one session per index (inputs seeded by the index, so a session gets the same ones in any process),
    sends each its prefill, calls ``start()`` (where all drivers meet), then steps every session from its own thread.
    Returns the step latencies, each session's finish time (CLOCK_MONOTONIC: comparable across processes) and errors.
    """
    sessions, tokens = {}, {}
    for index in indices:
        generator = torch.Generator().manual_seed(1000 + index)
        prompt = model.head.embed(torch.randint(3, VOCAB, (1, PROMPT_TOKENS), generator=generator))
        tokens[index] = model.head.embed(torch.randint(3, VOCAB, (1, steps), generator=generator))
        sessions[index] = model.inference_session(max_length=PROMPT_TOKENS + steps + 1)
        sessions[index].step(prompt)
    latencies, finished, errors = [], [], []

    def client(index: int) -> None:
        try:
            for t in range(steps):
                began = time.perf_counter()
                sessions[index].step(tokens[index][:, t : t + 1])
                latencies.append(time.perf_counter() - began)
            finished.append(time.perf_counter())
        except BaseException as e:  # reported by the caller
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in sessions]
    start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for session in sessions.values():
        session.close()
    return {"latencies": latencies, "finished": finished, "errors": errors}


def _summary(num_sessions: int, steps: int, began: float, reports: list[dict]) -> dict:
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise RuntimeError(f"{len(errors)} session(s) failed; first: {errors[0]}")
    elapsed = max(t for r in reports for t in r["finished"]) - began
    latencies = [t for r in reports for t in r["latencies"]]
    return {
        "sessions": num_sessions,
        "tokens": num_sessions * steps,
        "seconds": elapsed,
        "aggregate_tps": num_sessions * steps / elapsed,
        "median_step_ms": statistics.median(latencies) * 1e3,
    }


def run_sessions(model, num_sessions: int, *, steps: int = NEW_TOKENS) -> dict:
    """``num_sessions`` sessions from threads of this process (one client, like a gateway serving many users)."""
    began = []
    report = _drive(model, range(num_sessions), steps, start=lambda: began.append(time.perf_counter()))
    return _summary(num_sessions, steps, began[0], [report])


def _client_process(
    path: str,
    initial_peers: list,
    session_indices: list,
    steps: int,
    threads: int,
    barrier,
    results,
    receipts_ride: bool = True,
    voucher_interval: float = 0.25,
) -> None:
    """One load-generating client process (like one user's machine): its own DHT client, sessions and GIL."""
    set_threads(threads)
    model = distributed_model(path, list(initial_peers), receipts_ride=receipts_ride, voucher_interval=voucher_interval)
    try:
        results.put(_drive(model, session_indices, steps, start=lambda: barrier.wait(timeout=600)))
    except BaseException as e:
        results.put({"latencies": [], "finished": [], "errors": [repr(e)]})
        barrier.abort()
    finally:
        model.shutdown()


def run_sessions_in_processes(
    path,
    swarm,
    num_sessions: int,
    *,
    processes: int,
    threads: int,
    steps: int = NEW_TOKENS,
    receipts_ride: bool = True,
    voucher_interval: float = 0.25,
) -> dict:
    """``num_sessions`` sessions spread over ``processes`` client processes (threads inside each): the clients'
    own Python work then runs in parallel, as separate users' machines would, instead of behind one GIL."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = max(1, min(processes, num_sessions))
    barrier, results = context.Barrier(processes + 1), context.Queue()
    workers = [
        context.Process(
            target=_client_process,
            daemon=False,  # its DHT runs a child process
            args=(
                str(path),
                swarm.initial_peers,
                list(range(p, num_sessions, processes)),
                steps,
                threads,
                barrier,
                results,
                receipts_ride,
                voucher_interval,
            ),
        )
        for p in range(processes)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=600)
    began = time.perf_counter()
    reports = [results.get(timeout=1200) for _ in workers]
    for worker in workers:
        worker.join(60)
    return {**_summary(num_sessions, steps, began, reports), "client_processes": processes}


def run_load(model, path, swarm, num_sessions: int, args) -> dict:
    """``num_sessions`` sessions as the command line asks: over ``--client-processes`` processes (with
    ``--receipts-ride`` as each client's setting), or as threads of ``model``'s process when that is 0."""
    if not args.client_processes:
        return run_sessions(model, num_sessions)
    return run_sessions_in_processes(
        path,
        swarm,
        num_sessions,
        threads=args.threads,
        processes=args.client_processes,
        receipts_ride=args.receipts_ride,
        voucher_interval=getattr(args, "voucher_interval", 0.25),
    )


def compute_counters(model) -> dict:
    """The node's compute counters (rounds and steps so far), from its info RPC."""
    from nectar.wire.protocol import RPC_INFO, make_request, unpack_metadata
    from nectar.wire.stubs import call_unary

    ((peer, info),) = {p: i for block in model.sequence_manager.servers().values() for p, i in block.items()}.items()
    response = model.runtime.run(
        call_unary(model.runtime.p2p, peer, info, RPC_INFO, make_request("", [], {}), timeout=30), timeout=40
    )
    return unpack_metadata(response.metadata)["compute"]


def counters_since(before: dict, after: dict) -> dict:
    """The node's counters accumulated between two ``compute_counters`` readings (the max_* are not sums)."""
    return {k: after[k] - before.get(k, 0) for k in after if not k.startswith("max_")}


def concurrency_rows(results: dict, name: str = "session(s)") -> list[tuple[str, str]]:
    """One summary row per session count, against the first count measured."""
    base_sessions, base = next(iter(results.items()))
    return [
        (
            f"{n} {name}",
            f"{r['aggregate_tps']:8.1f} tok/s aggregate  "
            f"{r['aggregate_tps'] / base['aggregate_tps']:5.2f}x {base_sessions} session  "
            f"median step {r['median_step_ms']:6.1f} ms",
        )
        for n, r in results.items()
    ]


def node_time(result: dict) -> str:
    """Where the node's time went, per round and per step, from its counters."""
    rounds, steps = max(result["inference_rounds"], 1), max(result["inference_steps"], 1)
    return (
        f"; {steps / rounds:.1f} steps per forward, {result.get('graph_rounds', 0)} of {rounds} rounds replayed "
        f"as graphs ({result.get('graphs_recorded', 0)} recorded); per round: compute "
        f"{1e3 * result['inference_seconds'] / rounds:.1f} ms, gathering "
        f"{1e3 * result['gather_seconds'] / rounds:.1f} ms; per step: event loop "
        f"{1e3 * result['step_handling_seconds'] / steps:.2f} ms in handlers, "
        f"{1e3 * result['loop_cpu_seconds'] / steps:.2f} ms of its CPU, "
        f"{100 * result.get('receipts_riding', 0) / steps:.0f}% of receipts riding in the next answer, "
        f"{result.get('vouchers_checked', 0) / steps:.2f} voucher signatures checked"
    )


def largest_batch(swarm) -> int:
    """The most steps the node ran in one forward, from its log ("Batched N inference steps ...")."""
    found = [int(m) for m in re.findall(r"Batched (\d+) inference steps", swarm.nodes[0].log())]
    return max(found, default=1)


def main() -> None:
    parser = base_parser(__doc__, results_group="concurrency")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--node-args", default="", help='extra arguments for the node (quoted): "--batch-wait 0.5"')
    parser.add_argument(
        "--client-processes",
        type=int,
        default=0,
        help="spread the sessions over this many client processes (0 = one process, threads only)",
    )
    parser.add_argument(
        "--receipts-ride",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clients let the node send each receipt in the next step's answer (ClientConfig.receipts_ride)",
    )
    parser.add_argument(
        "--paid",
        action="store_true",
        help="the node charges 1 credit wei a token and block, from a free allowance, so clients pay with vouchers",
    )
    parser.add_argument(
        "--every-step-vouchers",
        action="store_true",
        help="with --paid: clients sign and the node checks a voucher every step (as before stop 48)",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    args.voucher_interval = 0.0 if args.every_step_vouchers else 0.25
    if args.paid:
        args.node_args += " --price 1 --free-credit-per-hour 1000000000000000"
        if args.every_step_vouchers:
            args.node_args += " --voucher-check-interval 0"
    args.node_args = with_session_cap(args.node_args, args.sessions, args.client_processes)
    path = checkpoint(args.model)
    results = {}
    with local_swarm(path, [(0, 8)], threads=args.threads, extra_args=args.node_args.split()) as swarm:
        model = distributed_model(path, swarm, receipts_ride=args.receipts_ride, voucher_interval=args.voucher_interval)
        try:
            run_sessions(model, 1, steps=4)  # warm-up: route, connections
            for repeat in range(args.repeats):  # alternate sizes, so the machine's load hits each alike
                for num_sessions in args.sessions:
                    before = compute_counters(model)
                    result = run_load(model, path, swarm, num_sessions, args)
                    after = compute_counters(model)
                    result.update(counters_since(before, after))
                    result["mean_batch"] = result["inference_steps"] / max(result["inference_rounds"], 1)
                    log(
                        f"  repeat {repeat}: {num_sessions:3d} sessions {result['aggregate_tps']:8.1f} tok/s, "
                        f"median step {result['median_step_ms']:.1f} ms{node_time(result)}"
                    )
                    if result["aggregate_tps"] > results.get(num_sessions, {}).get("aggregate_tps", 0):
                        results[num_sessions] = result
        finally:
            model.shutdown()
        biggest = largest_batch(swarm)
    base = results[args.sessions[0]]["aggregate_tps"]
    rows = []
    for num_sessions, result in results.items():
        rows.append(
            (
                f"{num_sessions} session(s)",
                f"{result['aggregate_tps']:8.1f} tok/s aggregate  {result['aggregate_tps'] / base:5.2f}x "
                f"{args.sessions[0]} session  median step {result['median_step_ms']:6.1f} ms  "
                f"{result['mean_batch']:5.1f} steps per forward",
            )
        )
    rows.append(("node compute", f"largest batch: {biggest} steps in one forward"))
    emit(
        f"Concurrent sessions on one node, {args.model}, float32 CPU, {args.threads} thread(s), "
        f"{PROMPT_TOKENS}+{NEW_TOKENS} tokens each",
        rows,
        {"results": results, "largest_batch": biggest},
        args.json,
    )


if __name__ == "__main__":
    main()
