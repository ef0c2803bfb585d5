"""The memory floor of single-session decode on this machine: how fast any exact float32 decoder could go.

A batch-1 decode step reads every weight matrix once (the embedding is one row), so its time is bounded below by
``weight bytes / memory bandwidth``. This script measures, in one process with ``--threads`` torch threads:

- the bytes one token reads (every ``nn.Linear`` of the checkpoint, the LM head included);
- the read bandwidth of a plain reduction over those same weights (``sum``), and of the batch-1 matrix-vector
  products alone (the decode's matmuls, no attention, norms or Python) with the weights in either memory layout
  and, [in, out], through numpy's OpenBLAS and nectar's C kernel too (nodes pick the fastest), each the best of
  ``--repeats``;
- local transformers ``generate()`` on the same checkpoint, for comparison.

With ``--petals-json`` (a ``bench_petals.py --json`` file), it also prints what a given multiple of Petals' decode
rate would need per token against the floors, e.g. whether "2.5x Petals" is reachable on this machine at all.

A node batching ``--rows`` sessions reads the weights once, but computes ``rows`` times as much: the blocks' matmuls
for that many rows (no LM head: clients run it) are the floor of such a round. With ``--concurrency-json`` (a
``bench_concurrency.py --json`` file with a 1-session run), it prints the most the aggregate rate of ``rows``
sessions could be over one session's measured rate.

    python benchmarks/roofline.py --model tiny --threads 1 \
        --petals-json benchmarks/results/petals/petals_tiny_push_head-in-out_run2.json
    python benchmarks/roofline.py --model mid --threads 2 \
        --concurrency-json benchmarks/results/concurrency/concurrency_mid_epyc.json
"""

from __future__ import annotations

import json
import statistics

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch
from common import (
    NEW_TOKENS,
    DecodeTiming,
    TokenClock,
    base_parser,
    checkpoint,
    emit,
    log,
    prompt_ids,
    set_threads,
    timed,
)

from nectar.models.cpu_blas import NATIVE_MAX_ROWS, CpuMatmul, native_kernel


def main() -> None:
    parser = base_parser(__doc__, results_group="roofline")
    parser.add_argument("--petals-json", default=None, help="a bench_petals.py --json result on this checkpoint")
    parser.add_argument("--multiple", type=float, default=2.5, help="the multiple of Petals' decode rate to test")
    parser.add_argument("--rows", type=int, default=16, help="sessions in a batched round")
    parser.add_argument("--concurrency-json", default=None, help="a bench_concurrency.py --json result (1 session)")
    args = parser.parse_args()
    set_threads(args.threads)
    repeats = max(args.repeats, 5)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint(args.model)), dtype=torch.float32).eval()
    weights = [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]
    nbytes = sum(weight.numel() * weight.element_size() for weight in weights)
    log(f"{len(weights)} weight matrices, {nbytes / 1e6:.1f} MB read per token")

    torch_blas, openblas = CpuMatmul(), CpuMatmul.everywhere("openblas")
    native = CpuMatmul.everywhere("native") if native_kernel() is not None else None  # nectar's one-pass C kernel
    with torch.inference_mode():
        vectors = [torch.randn(1, weight.shape[1]) for weight in weights]
        sum_s = timed(lambda: [weight.sum() for weight in weights], repeats)
        # the floor is the faster of the two memory layouts ([out, in] as nn.Linear keeps it, [in, out])
        in_out = [weight.t().contiguous() for weight in weights]
        gemv_usual_s = timed(lambda: [x @ w.t() for x, w in zip(vectors, weights)], repeats)
        gemv_in_out_s = timed(lambda: [x @ w for x, w in zip(vectors, in_out)], repeats)
        gemv_openblas_s = timed(lambda: [openblas(x, w) for x, w in zip(vectors, in_out)], repeats)
        gemv_native_s = (
            timed(lambda: [native(x, w) for x, w in zip(vectors, in_out)], repeats)
            if native is not None
            else float("inf")
        )
        gemv_s = min(gemv_usual_s, gemv_in_out_s, gemv_openblas_s, gemv_native_s)
        blocks = [w for w, weight in zip(in_out, weights) if weight is not model.lm_head.weight]  # as nodes keep them
        one_row, many_rows = ([torch.randn(count, weight.shape[0]) for weight in blocks] for count in (1, args.rows))

        def blocks_s(rows) -> float:  # nodes take the faster library for each row count (nectar.models.cpu_blas)
            libraries = [torch_blas, openblas] + ([native] if native and len(rows[0]) <= NATIVE_MAX_ROWS else [])
            return min(timed(lambda m=matmul: [m(x, w) for x, w in zip(rows, blocks)], repeats) for matmul in libraries)

        blocks_one_s, blocks_many_s = blocks_s(one_row), blocks_s(many_rows)

        model.generation_config.eos_token_id = None
        input_ids = prompt_ids()
        model.generate(input_ids, max_new_tokens=4, do_sample=False)
        timings = []
        for _ in range(args.repeats):
            clock = TokenClock()
            model.generate(
                input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock
            )
            timings.append(DecodeTiming.from_clock(clock))
    local_ms = min(statistics.median(t.gaps_s) for t in timings) * 1e3

    figures = {
        "model": args.model,
        "threads": args.threads,
        "bytes_per_token": nbytes,
        "sum_gbps": nbytes / sum_s / 1e9,
        "sum_floor_ms": sum_s * 1e3,
        "gemv_gbps": nbytes / gemv_s / 1e9,
        "gemv_floor_ms": gemv_s * 1e3,
        "gemv_out_in_ms": gemv_usual_s * 1e3,
        "gemv_in_out_ms": gemv_in_out_s * 1e3,
        "gemv_in_out_openblas_ms": gemv_openblas_s * 1e3,
        "gemv_in_out_native_ms": gemv_native_s * 1e3,
        "local_median_ms": local_ms,
        "local_gbps": nbytes / local_ms / 1e6,
    }
    table = [
        ("weights read per token", f"{nbytes / 1e6:.1f} MB ({len(weights)} matrices, LM head included)"),
        ("reduction over the weights", f"{sum_s * 1e3:.2f} ms: {figures['sum_gbps']:.1f} GB/s"),
        (
            "batch-1 matmuls alone",
            f"{gemv_s * 1e3:.2f} ms: {figures['gemv_gbps']:.1f} GB/s "
            f"(floor {1 / gemv_s:.1f} tok/s; weights [out, in] {gemv_usual_s * 1e3:.2f} ms, "
            f"[in, out] {gemv_in_out_s * 1e3:.2f} ms, [in, out] through numpy's OpenBLAS "
            f"{gemv_openblas_s * 1e3:.2f} ms, through nectar's C kernel "
            f"{gemv_native_s * 1e3:.2f} ms)",
        ),
        (
            "local transformers decode",
            f"{local_ms:.2f} ms/token (median of the best run): "
            f"{figures['local_gbps']:.1f} GB/s, {gemv_s * 1e3 / local_ms:.2f} of it "
            "is the matmuls' floor",
        ),
    ]
    rows_flops = 2 * args.rows * sum(weight.numel() for weight in blocks)
    figures.update(
        rows=args.rows,
        blocks_one_row_ms=blocks_one_s * 1e3,
        blocks_rows_ms=blocks_many_s * 1e3,
        blocks_rows_gflops=rows_flops / blocks_many_s / 1e9,
    )
    table += [
        ("blocks' matmuls, 1 row", f"{blocks_one_s * 1e3:.2f} ms"),
        (
            f"blocks' matmuls, {args.rows} rows",
            f"{blocks_many_s * 1e3:.2f} ms ({figures['blocks_rows_gflops']:.0f} "
            f"GFLOP/s): {args.rows} rows cost "
            f"{blocks_many_s / blocks_one_s:.2f}x one row",
        ),
    ]
    if args.concurrency_json:
        one = json.loads(open(args.concurrency_json).read())["figures"]["results"]["1"]
        one_ms = 1e3 * one["seconds"] / one["tokens"]
        cap = args.rows * one_ms / (blocks_many_s * 1e3)
        figures.update(one_session_ms=one_ms, rows_cap=cap)
        table.append(
            (
                f"{args.rows} sessions vs 1, at most",
                f"{cap:.2f}x (one session measured at {one_ms:.2f} ms a "
                f"token; a round of {args.rows} takes at least the "
                "matmuls above)",
            )
        )
    if args.petals_json:
        petals = json.loads(open(args.petals_json).read())["figures"]
        petals_tps = petals["petals"]["decode_tps"]
        needed_ms = 1e3 / (args.multiple * petals_tps)
        figures.update(petals_decode_tps=petals_tps, multiple=args.multiple, needed_ms=needed_ms)
        table += [
            ("Petals decode (from the file)", f"{petals_tps:.1f} tok/s"),
            (
                f"{args.multiple}x Petals needs",
                f"{needed_ms:.2f} ms/token: {nbytes / needed_ms / 1e6:.1f} GB/s, "
                f"{needed_ms / (gemv_s * 1e3):.2f}x the matmuls' floor, "
                f"{needed_ms / local_ms:.2f}x local transformers' time",
            ),
        ]
    emit(f"decode memory floor, {args.model}, float32 CPU, {args.threads} thread(s)", table, figures, args.json)


if __name__ == "__main__":
    main()
