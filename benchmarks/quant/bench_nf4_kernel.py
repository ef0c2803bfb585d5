"""nf4 products on a GPU: bitsandbytes' (as a node computes them, ``quant.NF4Rows``) against ``nf4_triton``'s kernel.

For each matrix of a Llama-2-7B and a Llama-2-70B block and 1, 4 and 16 rows, times both inside CUDA graphs (as a
node's recorded rounds run them), cycling over enough copies of the matrix that its codes come from HBM, not L2, and
prints microseconds and the codes' read rate (codes + scales per call over its time). Also checks the kernel against
bitsandbytes' dequantized weights multiplied in float32 (an error of a few units of the output dtype's last place).
The kernel's tile sizes are swept; the fastest over all shapes is what ``nf4_triton`` should use.

    python benchmarks/quant/bench_nf4_kernel.py --json OUT.json     # on the GPU machine, with .bnb carried
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {  # name -> (in_features, out_features) per matrix of a block
    "llama2-7b": {"q/k/v/o": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)},
    "llama2-70b": {"q/o": (8192, 8192), "k/v": (8192, 1024), "gate/up": (8192, 28672), "down": (28672, 8192)},
}
PER_BLOCK = {"q/k/v/o": 4, "gate/up": 2, "down": 1, "q/o": 2, "k/v": 2}
ONE_ROW = [  # (BLOCK_N, BLOCK_J, warps, x's pairs in one load, codes to values by selects)
    (block_n, block_j, warps, paired, select)
    for block_n, block_j, warps in [(8, 128, 2), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 8)]
    for paired in (False, True)
    for select in (False, True)
]
SEVERAL = [
    (block_n, block_j, warps, False, select)
    for block_n, block_j, warps in [(32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 64, 8), (32, 128, 4)]
    for select in (False, True)
]
PROGRAMS = [132, 264]
QUICK = {  # --quick: fewer tiles, for a call short of device time
    "one_row": [c for c in ONE_ROW if c[:3] in ((16, 128, 4), (32, 128, 4), (16, 256, 4))],
    "several_rows": [c for c in SEVERAL if c[:3] in ((64, 64, 4), (32, 128, 4), (128, 64, 8))],
    "programs": [264],
}


def timed(fn, calls: int, repeats: int = 5) -> float:
    """Microseconds per call of ``fn(i)`` for i in range(calls), recorded as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / calls)
    return best


def layer(in_features: int, out_features: int):
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.float16, quant_type="nf4", device="meta"
    )
    weight = torch.randn(out_features, in_features, dtype=torch.float16, device="cuda") * 0.02
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64, module=module)
    module.weight = module.weight._quantize("cuda")
    return module


def summarize(results: list, models: list, row_counts: list) -> tuple[list, dict]:
    """Per model and row count, one block's products; and per path the one config fastest over every block."""
    # per block and rows: bitsandbytes against the kernel's best single config over all matrices
    summary = []
    for model in models:
        for rows in row_counts:
            mine = [r for r in results if r["model"] == model and r["rows"] == rows]
            bnb_us = sum(r["bitsandbytes_us"] * PER_BLOCK[r["matrix"]] for r in mine)
            best_us = sum(r["best"]["us"] * PER_BLOCK[r["matrix"]] for r in mine)
            totals: dict = {}
            for r in mine:
                for k in r["kernel"]:
                    key = (tuple(k["config"]), k["programs"])
                    totals.setdefault(key, []).append(k["us"] * PER_BLOCK[r["matrix"]])
            one = min((sum(v), k) for k, v in totals.items() if len(v) == len(mine))
            block_bytes = sum(r["bytes"] * PER_BLOCK[r["matrix"]] for r in mine)
            line = {
                "model": model,
                "rows": rows,
                "bitsandbytes_us": round(bnb_us, 1),
                "kernel_best_each_us": round(best_us, 1),
                "kernel_one_config_us": round(one[0], 1),
                "one_config": [list(one[1][0]), one[1][1]],
                "speedup": round(bnb_us / one[0], 2),
            }
            summary.append(line)
            print(
                f"{model} one block, rows {rows:2}: bitsandbytes {bnb_us / 1e3:.3f} ms"
                f" ({block_bytes / bnb_us / 1e3:.0f} GB/s), kernel {one[0] / 1e3:.3f} ms"
                f" ({block_bytes / one[0] / 1e3:.0f} GB/s) with {one[1]}:"
                f" {bnb_us / one[0]:.2f}x",
                flush=True,
            )
    tiles = {}  # per path, the one config fastest over every block measured (7B and 70B weighted alike)
    for path, wanted in (("one_row", lambda rows: rows == 1), ("several_rows", lambda rows: rows > 1)):
        totals: dict = {}
        mine = [r for r in results if wanted(r["rows"])]
        for r in mine:
            block_us = sum(
                x["bitsandbytes_us"] * PER_BLOCK[x["matrix"]]
                for x in results
                if x["model"] == r["model"] and x["rows"] == r["rows"]
            )
            for k in r["kernel"]:  # as a share of bitsandbytes' block: each model and row count counts alike
                key = (*k["config"], k["programs"])
                totals.setdefault(key, []).append(k["us"] * PER_BLOCK[r["matrix"]] / block_us)
        complete = {key: sum(v) for key, v in totals.items() if len(v) == len(mine)}
        if complete:
            tiles[path] = list(min(complete, key=complete.get))
    return summary, tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="sweep fewer tiles (about a third of the time)")
    args = parser.parse_args()

    from nectar.models import nf4_triton
    from nectar.models.quant import NF4Rows, NF4Scratch

    began = time.time()
    print(f"{torch.cuda.get_device_name()} | torch {torch.version.__version__}", flush=True)
    results = []
    for model in args.models:
        for name, (in_f, out_f) in SHAPES[model].items():
            nbytes = in_f * out_f // 2 + in_f * out_f // 64 + 4 * (in_f * out_f // 64 // 256)
            copies = max(2, -(-400 * 2**20 // nbytes))  # codes of all copies well past the L2 cache
            copies = min(copies, args.calls)
            layers = [layer(in_f, out_f) for _ in range(copies)]
            scratch = NF4Scratch(layers, torch.float16, torch.device("cuda"))
            bnb_rows = [NF4Rows(m, scratch) for m in layers]
            weight = None
            for rows in args.rows:
                x = torch.randn(rows, in_f, dtype=torch.float16, device="cuda")
                row = {"model": model, "matrix": name, "in": in_f, "out": out_f, "rows": rows, "bytes": nbytes}
                with torch.inference_mode():
                    us = timed(lambda i, f=bnb_rows, c=copies, x=x: f[i % c](x), args.calls)
                    row["bitsandbytes_us"] = round(us, 2)
                    if weight is None:
                        import bitsandbytes.functional as bf

                        weight = bf.dequantize_4bit(layers[0].weight.data, layers[0].weight.quant_state).float()
                    reference = x.float() @ weight.t()
                    if args.quick:
                        configs = QUICK["one_row" if rows == 1 else "several_rows"]
                    else:
                        configs = ONE_ROW if rows == 1 else SEVERAL
                    best = None
                    for config in configs:
                        for programs in QUICK["programs"] if args.quick else PROGRAMS:
                            key = "one_row" if rows == 1 else "several_rows"
                            kernels = [nf4_triton.NF4Kernel(m, **{key: (*config, programs)}) for m in layers]
                            try:
                                error = (kernels[0](x).float() - reference).abs().max().item()
                                us = timed(lambda i, f=kernels, c=copies, x=x: f[i % c](x), args.calls)
                            except Exception as e:  # a tile this Triton cannot build: next one
                                print(f"  {config} {programs}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                                continue
                            row.setdefault("kernel", []).append(
                                {"config": list(config), "programs": programs, "us": round(us, 2), "error": error}
                            )
                            if best is None or us < best[0]:
                                best = (us, config, programs, error)
                if best is None:
                    print(f"{model} {name} rows {rows}: no tile built", flush=True)
                    continue
                row["best"] = {"us": round(best[0], 2), "config": list(best[1]), "programs": best[2], "error": best[3]}
                print(
                    f"{model:>10} {name:>7} [{in_f}x{out_f}] rows {rows:2}:"
                    f" bitsandbytes {row['bitsandbytes_us']:8.1f} us"
                    f" ({nbytes / row['bitsandbytes_us'] / 1e3:6.0f} GB/s)  kernel {best[0]:8.1f} us"
                    f" ({nbytes / best[0] / 1e3:6.0f} GB/s) {best[1]} programs {best[2]}, max error {best[3]:.2e}"
                    f" (outputs up to {reference.abs().max().item():.2f})  [{time.time() - began:.0f} s]",
                    flush=True,
                )
                results.append(row)
            layers = bnb_rows = scratch = weight = None
            torch.cuda.empty_cache()
    summary, tiles = summarize(results, args.models, args.rows)
    print(f"NF4_TILES={json.dumps(tiles)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "rows": results, "blocks": summary, "tiles": tiles},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
