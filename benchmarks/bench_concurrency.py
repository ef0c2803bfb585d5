"""Aggregate decode tokens/s of 1, 4, 16 and 64 concurrent inference sessions on one node (all 8 blocks).

Each session opens its own stream, sends a 16-token prefill, then 64 single-token steps, from its own client thread
(one client process, like a gateway serving many users). Clients send hidden states (embeddings of random tokens):
the LM head runs on client machines in a real deployment, so the figure is what the node serves. Aggregate tokens/s
counts decode steps of all sessions between the moment every prefill is done and the last session's last step.
The node batches concurrent steps into one forward (node/batching.py); its compute counters are printed too.

    python benchmarks/bench_concurrency.py --model tiny --sessions 1 4 16 64
"""
from __future__ import annotations

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)

import logging
import re
import statistics
import threading
import time

import torch

from common import NEW_TOKENS, PROMPT_TOKENS, base_parser, checkpoint, distributed_model, emit, local_swarm, log
from common import set_threads

logger = logging.getLogger(__name__)


def run_sessions(model, num_sessions: int, *, steps: int = NEW_TOKENS) -> dict:
    hidden = model.head.embedding_dim
    sessions = [model.inference_session(max_length=PROMPT_TOKENS + steps + 1) for _ in range(num_sessions)]
    generator = torch.Generator().manual_seed(num_sessions)
    prompts = [model.head.embed(torch.randint(3, 32000, (1, PROMPT_TOKENS), generator=generator))
               for _ in range(num_sessions)]
    tokens = [model.head.embed(torch.randint(3, 32000, (1, steps, 1), generator=generator)[0]).view(1, steps, hidden)
              for _ in range(num_sessions)]
    ready = threading.Barrier(num_sessions + 1)
    latencies: list[float] = []
    errors: list[BaseException] = []
    finished: list[float] = []

    def client(index: int) -> None:
        session = sessions[index]
        try:
            session.step(prompts[index])
            ready.wait()
            for t in range(steps):
                began = time.perf_counter()
                session.step(tokens[index][:, t : t + 1])
                latencies.append(time.perf_counter() - began)
            finished.append(time.perf_counter())
        except BaseException as e:  # reported below; a broken barrier must not hang the others
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(num_sessions)]
    for thread in threads:
        thread.start()
    ready.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    for session in sessions:
        session.close()
    if errors:
        raise RuntimeError(f"{len(errors)} session(s) failed; first: {errors[0]!r}")
    elapsed = max(finished) - began
    return {"sessions": num_sessions, "tokens": num_sessions * steps, "seconds": elapsed,
            "aggregate_tps": num_sessions * steps / elapsed, "median_step_ms": statistics.median(latencies) * 1e3}


def compute_counters(model) -> dict:
    """The node's compute counters (rounds and steps so far), from its info RPC."""
    from nectar.client.streams import call_unary
    from nectar.wire.protocol import RPC_INFO, make_request, unpack_metadata

    (peer, info), = {p: i for block in model.sequence_manager.servers().values() for p, i in block.items()}.items()
    response = model.runtime.run(call_unary(model.runtime.p2p, peer, info, RPC_INFO, make_request("", [], {}),
                                            timeout=30), timeout=40)
    return unpack_metadata(response.metadata)["compute"]


def largest_batch(swarm) -> int:
    """The most steps the node ran in one forward, from its log ("Batched N inference steps ...")."""
    found = [int(m) for m in re.findall(r"Batched (\d+) inference steps", swarm.nodes[0].log())]
    return max(found, default=1)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    results = {}
    with local_swarm(path, [(0, 8)], threads=args.threads) as swarm:
        model = distributed_model(path, swarm)
        try:
            run_sessions(model, 1, steps=4)  # warm-up: route, connections
            for repeat in range(args.repeats):  # alternate sizes, so the machine's load hits each alike
                for num_sessions in args.sessions:
                    before = compute_counters(model)
                    result = run_sessions(model, num_sessions)
                    after = compute_counters(model)
                    rounds = after["inference_rounds"] - before["inference_rounds"]
                    result["mean_batch"] = (after["inference_steps"] - before["inference_steps"]) / max(rounds, 1)
                    log(f"  repeat {repeat}: {num_sessions:3d} sessions {result['aggregate_tps']:8.1f} tok/s, "
                        f"median step {result['median_step_ms']:.1f} ms, {result['mean_batch']:.1f} steps per forward")
                    if result["aggregate_tps"] > results.get(num_sessions, {}).get("aggregate_tps", 0):
                        results[num_sessions] = result
        finally:
            model.shutdown()
        biggest = largest_batch(swarm)
    base = results[args.sessions[0]]["aggregate_tps"]
    rows = []
    for num_sessions, result in results.items():
        rows.append((f"{num_sessions} session(s)",
                     f"{result['aggregate_tps']:8.1f} tok/s aggregate  {result['aggregate_tps'] / base:5.2f}x "
                     f"{args.sessions[0]} session  median step {result['median_step_ms']:6.1f} ms  "
                     f"{result['mean_batch']:5.1f} steps per forward"))
    rows.append(("node compute", f"largest batch: {biggest} steps in one forward"))
    emit(f"Concurrent sessions on one node, {args.model}, float32 CPU, {args.threads} thread(s), "
         f"{PROMPT_TOKENS}+{NEW_TOKENS} tokens each", rows, {"results": results, "largest_batch": biggest}, args.json)


if __name__ == "__main__":
    main()
