"""Calibrates spot-check tolerances per precision on honest runs, and measures how often cheats are caught.

An honest node serves sessions with a KV cache (prefill, then one token per step); the auditor recomputes each step
with a full causal forward over the session's inputs in the node's own dtype (what ``LocalVerifier`` does). For each
audited step the statistic is ``nectar.wire.fingerprints.output_deviation`` (worst token's mean |difference| over
all hidden coordinates / mean |value|). The honest distribution's tail is fitted (peaks over the 95th percentile,
exponential) to estimate the 1e-6 quantile. Honest differences grow with the span's depth, about as sqrt(blocks), so
each run (model, span, dtype) gives a per-sqrt-block figure: the larger of its fitted 1e-6 quantile and its observed
maximum, over sqrt(blocks); the proposed ``TOLERANCE_PER_SQRT_BLOCK`` is ``--margin`` times the largest such figure
over all runs of the precision. Cheats are replayed on the same steps and the share of steps past the
tolerance in use (``nectar.wire.fingerprints.tolerance``) is their detection probability per audited step.

    python benchmarks/audit/audit_calibration.py --json results/audit/calibration_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from nectar.models import load_client_head, load_span
from nectar.models.tiny import save_tiny_checkpoint
from nectar.wire.fingerprints import TOLERANCE_PER_SQRT_BLOCK, ComputeSpec, output_deviation, tolerance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tail_quantile(values: np.ndarray, p: float) -> float:
    """The p upper quantile from an exponential fit to the exceedances over the 95th percentile."""
    u = float(np.quantile(values, 0.95))
    excess = values[values > u] - u
    if excess.size < 5:
        return float(values.max())
    beta = float(excess.mean())
    return u + beta * math.log(0.05 / p)


def cheats(y: torch.Tensor, claimed: torch.dtype, x_hist, span32, span_lo, span_skip, t) -> dict[str, torch.Tensor]:
    """What cheating nodes would have returned for this step, in the claimed dtype."""
    yf = y.float()
    m = yf.abs().mean()
    out = {
        "noise 1% of mean |x|": yf + 0.01 * m * torch.randn_like(yf),
        "noise 3% of mean |x|": yf + 0.03 * m * torch.randn_like(yf),
        "noise 0.3% of mean |x|": yf + 0.003 * m * torch.randn_like(yf),
    }
    top = yf.abs().topk(4, dim=-1).indices
    rest = yf + 0.05 * m * torch.randn_like(yf)
    out["top-4 kept, rest +5% noise"] = rest.scatter(-1, top, yf.gather(-1, top))
    with torch.inference_mode():
        out["last block skipped"] = span_skip(x_hist.to(claimed))[:, -t:].float()
        if span_lo is not None:
            out["lower precision claimed"] = span_lo(x_hist.to(span_lo.dtype))[:, -t:].float()
    return {k: v.to(claimed) for k, v in out.items()}


def run(
    name, path, dtype_name, *, sessions, prefill, decode, start, end, embed=None, seed=0, cheat_every=1, device="cpu"
):
    """The node runs on ``device`` (KV-cached steps); the auditor recomputes on the CPU."""
    dtype = DTYPES[dtype_name]
    span = load_span(path, start, end, dtype=dtype)
    node = load_span(path, start, end, dtype=dtype, device=device) if device != "cpu" else span
    prefix = load_span(path, 0, start, dtype=torch.float32) if embed is not None and start > 0 else None
    skip = load_span(path, start, end - 1, dtype=dtype) if end - start > 1 else None
    lower = {"float32": torch.bfloat16, "float16": torch.bfloat16, "bfloat16": None}[dtype_name]
    span_lo = load_span(path, start, end, dtype=lower) if lower is not None else None
    hidden = span.hidden_size
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    honest, caught = [], {}
    tol = tolerance(ComputeSpec(dtype_name), end - start)
    step_index = 0
    for _ in range(sessions):
        length = prefill + decode
        if embed is not None:
            x = embed.embed(torch.randint(0, embed.vocab_size, (1, length), generator=g)).float()
            if prefix is not None:  # the span's real inputs: the hidden states after the blocks before it
                with torch.inference_mode():
                    x = prefix(x).float()
        else:
            x = torch.randn(1, length, hidden, generator=g)
        cache = node.new_cache(1, length)
        pos = 0
        for t in [prefill] + [1] * decode:
            with torch.inference_mode():
                y = node(x[:, pos : pos + t].to(device, dtype), cache=cache).cpu()
                r = span(x[:, : pos + t].to(dtype))[:, -t:]
            honest.append(output_deviation(y, r))
            if skip is not None and step_index % cheat_every == 0:
                for k, v in cheats(y, dtype, x[:, : pos + t], None, span_lo, skip, t).items():
                    caught.setdefault(k, []).append(output_deviation(v, r) > tol)
            step_index += 1
            pos += t
    return {
        "model": name,
        "dtype": dtype_name,
        "span": f"{start}:{end}",
        "blocks": end - start,
        "honest": honest,
        "caught": caught,
    }


def summarize(rows, margin):
    by_dtype = {}
    for row in rows:
        by_dtype.setdefault(row["dtype"], []).append(row)
    out = {}
    for dtype_name, group in by_dtype.items():
        per_run = {}
        for row in group:
            values = np.array(row["honest"])
            q6 = tail_quantile(values, 1e-6)
            limit = tolerance(ComputeSpec(dtype_name), row["blocks"])
            per_run[f"{row['model']}[{row['span']}]"] = {
                "steps": int(values.size),
                "blocks": row["blocks"],
                "max": float(values.max()),
                "p50": float(np.median(values)),
                "p99": float(np.quantile(values, 0.99)),
                "fitted_q1e-6": q6,
                "per_sqrt_block": max(q6, float(values.max())) / math.sqrt(row["blocks"]),
                "tolerance_in_use": limit,
                "false_accusations": int((values > limit).sum()),
                "detection": {k: float(np.mean(v)) for k, v in row["caught"].items()},
            }
        worst = max(r["per_sqrt_block"] for r in per_run.values())
        out[dtype_name] = {
            "honest_steps": sum(r["steps"] for r in per_run.values()),
            "false_accusations": sum(r["false_accusations"] for r in per_run.values()),
            "worst_per_sqrt_block": worst,
            "proposed_tolerance_per_sqrt_block": margin * worst,
            "tolerance_per_sqrt_block_in_use": TOLERANCE_PER_SQRT_BLOCK[dtype_name],
            "runs": per_run,
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-sessions", type=int, default=240, help="sessions per tiny model and dtype")
    parser.add_argument("--builtin-sessions", type=int, default=8, help="sessions of the built-in model per span")
    parser.add_argument("--device", default="cpu", help="where the node computes (the auditor is on the CPU)")
    parser.add_argument("--decode", type=int, default=14)
    parser.add_argument("--prefill", type=int, default=6)
    parser.add_argument("--margin", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--skip-builtin", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path("/tmp/nectar-audit-calibration")
    tiny = {}
    for kind in ("llama", "mistral", "bloom"):
        path = root / f"tiny-{kind}"
        if not (path / "config.json").exists():
            save_tiny_checkpoint(path, kind, num_layers=4, hidden_size=64)
        tiny[kind] = path
    deep = root / "tiny-llama-16"  # depth scaling on random weights: spans of 1, 4 and 16 blocks
    if not (deep / "config.json").exists():
        save_tiny_checkpoint(deep, "llama", num_layers=16, hidden_size=64, seed=1)
    began, rows = time.time(), []
    for dtype_name in args.dtypes:
        for kind, path in tiny.items():
            rows.append(
                run(
                    f"tiny-{kind}",
                    path,
                    dtype_name,
                    sessions=args.tiny_sessions,
                    prefill=args.prefill,
                    decode=args.decode,
                    start=0,
                    end=4,
                    cheat_every=4,
                    device=args.device,
                )
            )
            print(
                f"{dtype_name} tiny-{kind}: max {max(rows[-1]['honest']):.2e} ({time.time() - began:.0f}s)", flush=True
            )
        for start, end in ((0, 16), (0, 1), (6, 10)):
            rows.append(
                run(
                    "tiny-llama-16",
                    deep,
                    dtype_name,
                    sessions=args.tiny_sessions // 4,
                    prefill=args.prefill,
                    decode=args.decode,
                    start=start,
                    end=end,
                    cheat_every=4,
                    device=args.device,
                )
            )
            print(f"{dtype_name} tiny-llama-16 {start}:{end}: max {max(rows[-1]['honest']):.2e}", flush=True)
        if not args.skip_builtin:
            head = load_client_head("smollm2-135m")
            for start, end in ((0, 30), (0, 10), (10, 20), (20, 30), (0, 3), (15, 18), (29, 30)):
                rows.append(
                    run(
                        "smollm2-135m",
                        "smollm2-135m",
                        dtype_name,
                        sessions=args.builtin_sessions,
                        prefill=args.prefill,
                        decode=args.decode,
                        start=start,
                        end=end,
                        embed=head,
                        seed=start + 1,
                        cheat_every=2,
                        device=args.device,
                    )
                )
                print(
                    f"{dtype_name} smollm2 {start}:{end}: max {max(rows[-1]['honest']):.2e} "
                    f"({time.time() - began:.0f}s)",
                    flush=True,
                )
    summary = summarize(rows, args.margin)
    print(json.dumps(summary, indent=1))
    if args.json:
        path = Path(args.json)
        if not path.is_absolute() and len(path.parts) == 1:
            path = Path(__file__).parent.parent / "results" / "audit" / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
