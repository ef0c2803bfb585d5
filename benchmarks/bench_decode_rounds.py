"""A CPU node's decode rounds of many sessions, in process (no network): the attention in C over each session's own
cache (``nectar_decode_attention_f32``) against PyTorch's one SDPA over the caches padded into a batch.

Each session is prefilled with 16 tokens, then every round gives each session one new token, up to 64 rounds (as
``bench_concurrency.py``'s sessions do). The two routes run on the same blocks, rounds alternating between two sets
of sessions, so the machine's load hits both alike; the median round of each is reported.

    python benchmarks/bench_decode_rounds.py --model tiny --threads 1 --sessions 1 4 16 64
"""

from __future__ import annotations

import statistics
import time

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch
from common import NEW_TOKENS, NUM_LAYERS, PROMPT_TOKENS, base_parser, checkpoint, emit, log, set_threads

from nectar.node.backend import SpanBackend


def sessions_of(backend: SpanBackend, count: int, generator: torch.Generator) -> list:
    """``count`` sessions' caches, each prefilled with PROMPT_TOKENS tokens."""
    caches = []
    for _ in range(count):
        cache = backend.new_caches(backend.start, backend.end, 1, PROMPT_TOKENS + NEW_TOKENS)
        prompt = torch.randn(1, PROMPT_TOKENS, backend.hidden_size, generator=generator)
        backend.run_inference([backend.inference_task(prompt, cache, start=backend.start, end=backend.end, position=0)])
        caches.append(cache)
    return caches


@torch.inference_mode()
def measure(backend: SpanBackend, count: int, generator: torch.Generator) -> dict[str, float]:
    """Median seconds of a decode round of ``count`` sessions on each route."""
    runner = backend.batch_runner
    kernel = runner.native_attention
    if kernel is None:
        raise SystemExit("the C kernel is not available here (NECTAR_NATIVE=off, or no C compiler)")
    routes = {"c": kernel, "padded": None}
    sessions = {route: sessions_of(backend, count, generator) for route in routes}
    seconds = {route: [] for route in routes}
    for _ in range(NEW_TOKENS - 1):
        for route, choice in routes.items():
            runner.native_attention = choice
            tasks = [
                backend.inference_task(
                    torch.randn(1, 1, backend.hidden_size, generator=generator),
                    cache,
                    start=backend.start,
                    end=backend.end,
                    position=cache[0].length,
                )
                for cache in sessions[route]
            ]
            began = time.perf_counter()
            backend.run_inference(tasks)
            seconds[route].append(time.perf_counter() - began)
    runner.native_attention = kernel
    return {route: statistics.median(times) for route, times in seconds.items()}


def main() -> None:
    parser = base_parser(__doc__, results_group="decode_rounds")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    backend = SpanBackend(str(path), 0, NUM_LAYERS, dtype=torch.float32, device="cpu", show_progress=False)
    generator = torch.Generator().manual_seed(0)
    rows, figures = [], {}
    for count in args.sessions:
        best = None
        for repeat in range(args.repeats):
            result = measure(backend, count, generator)
            log(
                f"  {count:3d} sessions, repeat {repeat}: C {1e3 * result['c']:.2f} ms, padded SDPA "
                f"{1e3 * result['padded']:.2f} ms a round"
            )
            best = result if best is None or result["c"] + result["padded"] < best["c"] + best["padded"] else best
        figures[count] = best
        rows.append(
            (
                f"{count} session(s)",
                f"C {1e3 * best['c']:7.2f} ms, padded SDPA {1e3 * best['padded']:7.2f} ms a round "
                f"({best['padded'] / best['c']:.2f}x); C {count / best['c']:7.1f} tok/s",
            )
        )
    emit(f"Decode rounds on one CPU node, {args.model}, float32, {args.threads} thread(s)", rows, figures, args.json)


if __name__ == "__main__":
    main()
