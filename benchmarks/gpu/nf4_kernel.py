"""nf4 products on a GPU: bitsandbytes' (one-row kernel, or dequantize + cuBLAS for several rows) against
``nectar.models.nf4_triton``'s kernel, per matrix of a Llama block, 1 and 16 rows, timed inside CUDA graphs.

    python benchmarks/gpu/nf4_kernel.py --shape llama2-7b llama2-70b [--sweep] [--json OUT]

Prints each product's time and the codes' read bandwidth (codes + absmax bytes over the time); ``--sweep`` also
times the kernel's tile sizes, to choose ``NF4Product``'s.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

os.environ.setdefault("NECTAR_DECODE_ROUTE", "triton")

SHAPES = {  # (in, out) per matrix: q, k/v, o, gate/up, down
    "llama2-7b": {"q/o": (4096, 4096), "k/v": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)},
    "llama2-70b": {"q/o": (8192, 8192), "k/v": (8192, 1024), "gate/up": (8192, 28672), "down": (28672, 8192)},
}
COUNTS = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}  # matrices of each kind a block reads


def timed(fn, *args, repeats: int = 50) -> float:
    """ms per call, replaying a CUDA graph of ``repeats`` calls (no launch gaps, as in a recorded round)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", default=["llama2-7b", "llama2-70b"], choices=sorted(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's tile sizes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from nectar.models.quant import _nf4_linear, few_row_product

    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.dtype}", flush=True)
    results = []
    torch.manual_seed(0)
    for shape in args.shape:
        block = {"bnb": {r: 0.0 for r in args.rows}, "triton": {r: 0.0 for r in args.rows}, "bytes": 0}
        for name, (k, n) in SHAPES[shape].items():
            linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
            layer = _nf4_linear(linear, dtype)
            del linear
            product = few_row_product(layer)
            state = layer.weight.quant_state
            nbytes = layer.weight.data.numel() + state.absmax.numel() * state.absmax.element_size()
            block["bytes"] += COUNTS[name] * nbytes
            for rows in args.rows:
                x = torch.randn(rows, k, device="cuda", dtype=dtype)
                with torch.inference_mode():
                    theirs = timed(layer, x)
                    mine = timed(product, x)
                block["bnb"][rows] += COUNTS[name] * theirs
                block["triton"][rows] += COUNTS[name] * mine
                row = {"shape": shape, "matrix": name, "rows": rows, "bnb_ms": theirs, "triton_ms": mine}
                row["triton_gbs"] = nbytes / mine / 1e6
                row["bnb_gbs"] = nbytes / theirs / 1e6
                print(
                    f"{shape:>10} {name:>7} [{k}x{n}] rows {rows:>2}: bitsandbytes {theirs * 1e3:8.1f} us "
                    f"({row['bnb_gbs']:6.0f} GB/s)  Triton {mine * 1e3:8.1f} us ({row['triton_gbs']:6.0f} GB/s)",
                    flush=True,
                )
                if args.sweep:
                    defaults = (product.block_n, product.block_k, product.num_warps)
                    best = (mine, *defaults)
                    for block_n in (16, 32, 64):
                        for block_k in (128, 256):
                            for warps in (4, 8):
                                if k % block_k:
                                    continue
                                product.block_n, product.block_k, product.num_warps = block_n, block_k, warps
                                try:
                                    with torch.inference_mode():
                                        t = timed(product._product, x, rows, repeats=20)
                                except Exception as error:  # a tile Triton cannot build here
                                    print(f"      {block_n}x{block_k} w{warps}: {type(error).__name__}")
                                    continue
                                best = min(best, (t, block_n, block_k, warps))
                    row["best"] = {"ms": best[0], "block_n": best[1], "block_k": best[2], "num_warps": best[3]}
                    print(f"      best tile: {best[1]}x{best[2]}, {best[3]} warps: {best[0] * 1e3:.1f} us", flush=True)
                    product.block_n, product.block_k, product.num_warps = defaults
                results.append(row)
        for rows in args.rows:
            bw = block["bytes"] / 1e6
            print(
                f"{shape:>10} one block, rows {rows:>2}: bitsandbytes {block['bnb'][rows]:.3f} ms "
                f"({bw / block['bnb'][rows]:.0f} GB/s), Triton {block['triton'][rows]:.3f} ms "
                f"({bw / block['triton'][rows]:.0f} GB/s): {block['bnb'][rows] / block['triton'][rows]:.2f}x",
                flush=True,
            )
            results.append(
                {"shape": shape, "block": True, "rows": rows, **{k: block[k][rows] for k in ("bnb", "triton")}}
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
