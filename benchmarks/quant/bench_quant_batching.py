"""Concurrent sessions' decode rounds on a quantized span: the batched runner against one session at a time.

Before batched quantized rounds, a node with ``--quant nf4|int8`` had no batch runner and ran every session's step
alone through the generic path (``batching=False`` runs exactly that path). Both sides run in this process on the
same random-weight span: prompts first, then ``--steps`` decode rounds of ``--sessions`` sessions, timed.

    python benchmarks/quant/bench_quant_batching.py --mode nf4 --threads 1
    python benchmarks/quant/bench_quant_batching.py --mode nf4 --device cuda --dtype float16 --hidden 4096 \
        --intermediate 11008 --heads 32 --kv-heads 32 --sessions 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.backend import SpanBackend


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rounds(path: Path, args, *, batching: bool) -> dict:
    dtype = getattr(torch, args.dtype)
    backend = SpanBackend(
        path,
        0,
        args.blocks,
        dtype=dtype,
        device=args.device,
        quantization=args.mode,
        show_progress=False,
        batching=batching,
    )
    generator = torch.Generator().manual_seed(0)
    caches = [backend.new_caches(0, args.blocks, 1, args.prompt + args.steps + 1) for _ in range(args.sessions)]

    def round_of(hidden: list[torch.Tensor], position: int) -> None:
        tasks = [
            backend.inference_task(h, c, start=0, end=args.blocks, position=position) for h, c in zip(hidden, caches)
        ]
        backend.run_inference(tasks)

    round_of([torch.randn(1, args.prompt, args.hidden, generator=generator) for _ in caches], 0)
    tokens = torch.randn(args.steps, len(caches), 1, 1, args.hidden, generator=generator)
    sync(args.device)
    began = time.perf_counter()
    for step in range(args.steps):
        round_of(list(tokens[step]), args.prompt + step)
    sync(args.device)
    seconds = time.perf_counter() - began
    return {
        "batched": backend.batch_runner is not None,
        "tok_s": args.sessions * args.steps / seconds,
        "round_ms": 1e3 * seconds / args.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["nf4", "int8"], default="nf4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32, help="decode rounds timed")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = save_tiny_checkpoint(
            Path(folder) / "span",
            "llama",
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_layers=args.blocks,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(512, args.prompt + args.steps + 1),
        )
        results = {False: [], True: []}
        for _ in range(args.repeats):
            for batching in (False, True):
                results[batching].append(rounds(path, args, batching=batching))
    print(f"{args.mode} weights, {args.device} {args.dtype}, {args.threads} thread(s), {args.sessions} sessions:")
    for batching, name in ((False, "one session at a time"), (True, "batched rounds")):
        top = max(results[batching], key=lambda r: r["tok_s"])
        print(f"  {name:24s} {top['tok_s']:8.1f} tok/s aggregate  ({top['round_ms']:.1f} ms a round, best of runs)")
    best = {b: max(r["tok_s"] for r in results[b]) for b in results}
    print(f"  batched / one at a time: {best[True] / best[False]:.2f}x")


if __name__ == "__main__":
    main()
