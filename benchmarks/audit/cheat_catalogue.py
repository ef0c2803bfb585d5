"""Cheat catalogue (issue 21, item 6): per cheat and precision, how often one audited step convicts it, how many served
steps it takes at the default audit rate, what it changes in the text, and its expected value.

A node serves all 30 blocks of the built-in SmolLM2-135M (real token embeddings in, KV-cached steps: a prefill, then
one token per step) in float32, bfloat16 or float16. For every step the auditor recomputes the span from the step's
input history in the precision the receipt commits to, as ``LocalVerifier`` does, and judges each cheat's revealed
output with ``nectar.wire.fingerprints.outputs_match`` (the comparison ``SpotChecker`` makes; the end-to-end path
through intake, SQLite and ``SpotChecker`` is tests/ledger/test_precision_audits.py). In process, not over hivemind:
the evasion cheats (refused audits, withheld receipts, a wrong model id) are issue 21's item 3, on another branch.

Per cheat: d = share of audited steps convicted; tokens changed = share of next tokens (argmax of the model's head
on the output) that differ from the honest node's; steps to a 99% conviction = ln(0.01) / ln(1 - q d) served steps at
q = ``--q``; EV per 1,000 served steps = saved compute x price - P(convicted) x slash (10% of the 100-credit minimum
stake, one case per epoch), reported as the price per step above which cheating would pay.

    python benchmarks/audit/cheat_catalogue.py --json catalogue_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from pooled_calibration import cusum_convictions, increments, steps_to_conviction  # this folder (run as a script)

from nectar.ledger.core.config import Settings
from nectar.ledger.spot_check import audit_rate
from nectar.models import load_client_head, load_span
from nectar.wire.fingerprints import (
    POOLED_CUSUM,
    POOLED_DTYPES,
    ComputeSpec,
    output_deviation,
    pooled_increment,
    pooled_score,
    tolerance,
)

MODEL, BLOCKS = "smollm2-135m", 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SLASH_CREDITS = 10.0  # 10% of the 100-credit minimum stake (docs/economics.md)


def fake_int8(span) -> None:
    """Weights rounded to int8 per output row (symmetric), as a node serving int8 weights would compute."""
    with torch.no_grad():
        for p in span.parameters():
            if p.dim() == 2:
                scale = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
                p.copy_((p / scale).round().clamp(-127, 127) * scale)


def noise(level):
    return lambda c: c["y"].float() + level * c["y"].float().abs().mean() * torch.randn(c["y"].shape, generator=c["g"])


def top4(level):
    def cheat(c):
        x = c["y"].float()
        top = x.abs().topk(4, dim=-1).indices
        rest = x + level * x.abs().mean() * torch.randn(x.shape, generator=c["g"])
        return rest.scatter(-1, top, x.gather(-1, top))

    return cheat


# name -> (function of the step's context -> revealed output, share of the span's compute it saves)
CHEATS = {
    "noise 0.3% of mean |x|": (noise(0.003), 0.0),
    "noise 1% of mean |x|": (noise(0.01), 0.0),
    "noise 3% of mean |x|": (noise(0.03), 0.0),
    "noise 10% of mean |x|": (noise(0.1), 0.0),
    "top-4 kept, the rest +1% noise": (top4(0.01), 0.0),
    "top-4 kept, the rest +5% noise": (top4(0.05), 0.0),
    "last block skipped": (lambda c: c["skip1"], 1 / BLOCKS),
    "half the blocks skipped": (lambda c: c["skip_half"], 0.5),
    "int8 weights": (lambda c: c["int8"], 0.5),
    "context cut to the last 8 tokens": (lambda c: c["short"], 0.0),
    "stale: the previous step's output": (lambda c: c["stale"], 1.0),
    "bfloat16 computed, claimed as this precision": (lambda c: c["bf16"], 0.5),
    "float16 computed, claimed as this precision": (lambda c: c["fp16"], 0.5),
}


def adaptive_steps_to_conviction(scores, caught, dtype_name, q, gain, cap, rng, trials=2000, horizon=20_000):
    """Served steps to conviction per trial with the ledger's adaptive rate (``audit_rate``): from one audit to the next
    the node's steps are picked at the rate its CUSUM then gives (``SpotChecker.escalate``), each audited step drawn
    from the cheat's observed steps (pooled score, single-step verdict). Also returns audits per served step / q."""
    drift, threshold = POOLED_CUSUM[dtype_name]
    scores, caught = increments(scores), np.asarray(caught, dtype=bool)
    out, audits, served_all = [], 0, 0
    for _ in range(trials):
        s, served, convicted = 0.0, 0, False
        while True:
            served += int(rng.geometric(audit_rate(q, s / threshold, gain, cap)))
            if served > horizon:
                break
            i = rng.integers(0, len(scores))
            audits += 1
            s = max(0.0, s + scores[i] - drift)
            if caught[i] or s >= threshold:
                convicted = True
                break
        out.append(served if convicted else math.inf)
        served_all += min(served, horizon)
    return np.array(out, dtype=float), audits / (q * served_all)


def honest_rate_multiplier(runs, dtype_name, q, gain, cap) -> float:
    """Expected audits per served step over q for an honest node: its scores in order (each run its own node), the
    gap before each audit 1 / the rate its CUSUM gave after the previous one."""
    drift, threshold = POOLED_CUSUM[dtype_name]
    audits, served = 0, 0.0
    for scores in runs:
        s = 0.0
        for z in scores:
            served += 1 / audit_rate(q, s / threshold, gain, cap)
            audits += 1
            s = max(0.0, s + pooled_increment(z) - drift)
    return audits / (q * served)


def run_precision(dtype_name, head, *, sessions, prefill, decode, q, seed, gain, cap):
    dtype = DTYPES[dtype_name]
    spec = ComputeSpec(dtype_name)
    limit = tolerance(spec, BLOCKS)
    span = load_span(MODEL, 0, BLOCKS, dtype=dtype)
    skip1 = load_span(MODEL, 0, BLOCKS - 1, dtype=dtype)
    skip_half = load_span(MODEL, 0, BLOCKS // 2, dtype=dtype)
    int8 = load_span(MODEL, 0, BLOCKS, dtype=dtype)
    fake_int8(int8)
    others = {
        "bf16": load_span(MODEL, 0, BLOCKS, dtype=torch.bfloat16) if dtype_name != "bfloat16" else None,
        "fp16": load_span(MODEL, 0, BLOCKS, dtype=torch.float16) if dtype_name == "float32" else None,
    }
    span32 = load_span(MODEL, 0, BLOCKS, dtype=torch.float32) if dtype_name in POOLED_DTYPES else None
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    honest_dev, caught, changed = [], {k: [] for k in CHEATS}, {k: [] for k in CHEATS}
    honest_score, scores = [], {k: [] for k in CHEATS}
    for _ in range(sessions):
        length = prefill + decode
        x = head.embed(torch.randint(0, head.vocab_size, (1, length), generator=g)).float()
        caches = {"y": span.new_cache(1, length), "skip1": skip1.new_cache(1, length)}
        caches |= {"skip_half": skip_half.new_cache(1, length), "int8": int8.new_cache(1, length)}
        caches |= {k: s.new_cache(1, length) for k, s in others.items() if s is not None}
        pos, previous = 0, None
        for t in [prefill] + [1] * decode:
            step_in = x[:, pos : pos + t]
            with torch.inference_mode():
                c = {"g": g, "y": span(step_in.to(dtype), cache=caches["y"])}
                c["skip1"] = skip1(step_in.to(dtype), cache=caches["skip1"])
                c["skip_half"] = skip_half(step_in.to(dtype), cache=caches["skip_half"])
                c["int8"] = int8(step_in.to(dtype), cache=caches["int8"])
                for k, s in others.items():
                    if s is not None:
                        c[k] = s(step_in.to(s.dtype), cache=caches[k]).to(dtype)
                c["short"] = span(x[:, max(0, pos + t - 8) : pos + t].to(dtype))[:, -t:]
                c["stale"] = previous[:, -t:] if previous is not None and previous.shape[1] >= t else c["y"]
                recomputed = span(x[:, : pos + t].to(dtype))[:, -t:]
                reference = span32(x[:, : pos + t])[:, -t:] if span32 is not None else None
                honest_tokens = head.logits(c["y"].float()).argmax(-1)
                honest_dev.append(output_deviation(c["y"], recomputed))
                if reference is not None:
                    honest_score.append(pooled_score(c["y"], recomputed, reference, spec))
                for name, (cheat, _) in CHEATS.items():
                    if (name.startswith("bfloat16 computed") and others["bf16"] is None) or (
                        name.startswith("float16 computed") and others["fp16"] is None
                    ):
                        continue  # not a lower precision than this one
                    if name.startswith("stale") and previous is None:
                        continue  # a first step has nothing stale to send
                    revealed = cheat(c).to(dtype)
                    caught[name].append(output_deviation(revealed, recomputed) > limit)
                    if reference is not None:
                        scores[name].append(pooled_score(revealed, recomputed, reference, spec))
                    changed[name].append(
                        float((head.logits(revealed.float()).argmax(-1) != honest_tokens).float().mean())
                    )
            previous = c["y"]
            pos += t
    rows, rng = {}, np.random.default_rng(seed)
    for name, (_, saved) in CHEATS.items():
        if not caught[name]:
            continue
        d = float(np.mean(caught[name]))
        per_step = q * d
        p1000 = 1 - (1 - per_step) ** 1000
        steps99 = math.log(0.01) / math.log(1 - per_step) if per_step > 0 else float("inf")
        rows[name] = {
            "audited_steps": len(caught[name]),
            "detection_per_audited_step": d,
            "next_tokens_changed": float(np.mean(changed[name])),
            "p_convicted_within_1000_steps": p1000,
            "served_steps_to_99pct_conviction": steps99,
            "compute_saved": saved,
            "expected_slash_per_1000_steps_credits": SLASH_CREDITS * p1000,
            "break_even_price_per_step_credits": (SLASH_CREDITS * p1000 / (1000 * saved)) if saved else None,
        }
        if scores[name]:  # single-step and pooled tests together, audits Bernoulli(q) over served steps
            fixed = steps_to_conviction(scores[name], *POOLED_CUSUM[dtype_name], q, rng, caught=caught[name])
            served, multiplier = adaptive_steps_to_conviction(scores[name], caught[name], dtype_name, q, gain, cap, rng)
            p_pooled = float(np.mean(served <= 1000))
            rows[name] |= {
                "pooled_scores": [round(float(z), 4) for z in scores[name]],
                "single_step_caught": [bool(c) for c in caught[name]],
                "pooled_fixed_rate_p_convicted_within_1000_steps": float(np.mean(fixed <= 1000)),
                "adaptive_rate_multiplier": multiplier,
                "pooled_mean_score": float(np.mean(scores[name])),
                "pooled_p_convicted_within_1000_steps": p_pooled,
                "pooled_median_served_steps_to_conviction": float(np.median(served)),
                "pooled_p99_served_steps_to_conviction": (
                    float(np.quantile(served, 0.99)) if np.mean(np.isinf(served)) <= 0.01 else float("inf")
                ),
                "expected_slash_per_1000_steps_credits": SLASH_CREDITS * max(p1000, p_pooled),
            }
    devs = np.array(honest_dev)
    return {
        "tolerance": limit,
        "honest": {
            "audited_steps": int(devs.size),
            "false_accusations": int((devs > limit).sum()),
            "max": float(devs.max()),
            "pooled_convictions": cusum_convictions(honest_score, dtype_name) if honest_score else None,
            "adaptive_rate_multiplier": (
                honest_rate_multiplier([honest_score], dtype_name, q, gain, cap) if honest_score else None
            ),
            "pooled_mean_score": float(np.mean(honest_score)) if honest_score else None,
        },
        "cheats": rows,
    }


def _steps(n: float) -> str:
    return "never" if n == float("inf") else f"{n:,.0f}"


def table(results, q) -> str:
    lines = [
        f"| cheat | precision | tokens changed | detection per audited step | P(convicted) in 1,000 steps at q = {q} "
        "| served steps to 99% | pooled + single, adaptive rate: P(convicted) in 1,000 (at fixed q) | pooled + single, "
        "adaptive rate: served steps to conviction, median / 99th pct | audit rate (x q) | EV per 1,000 steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype_name, result in results.items():
        for name, r in result["cheats"].items():
            steps = r["served_steps_to_99pct_conviction"]
            ev = (
                f"-{r['expected_slash_per_1000_steps_credits']:.2f} credits (sabotage: saves nothing)"
                if not r["compute_saved"]
                else f"1000 x {r['compute_saved']:.2g} x price - {r['expected_slash_per_1000_steps_credits']:.2f} "
                f"credits: negative below {r['break_even_price_per_step_credits']:.2g} credits/step"
            )
            pooled = (
                (
                    f"{r['pooled_p_convicted_within_1000_steps']:.3f} "
                    f"({r['pooled_fixed_rate_p_convicted_within_1000_steps']:.3f}; "
                    f"score {r['pooled_mean_score']:.2f}) | "
                    f"{_steps(r['pooled_median_served_steps_to_conviction'])} / "
                    f"{_steps(r['pooled_p99_served_steps_to_conviction'])} | {r['adaptive_rate_multiplier']:.2f}"
                )
                if "pooled_mean_score" in r
                else "(float32: single step only) | | 1"
            )
            lines.append(
                f"| {name} | {dtype_name} | {100 * r['next_tokens_changed']:.1f}% | "
                f"{r['detection_per_audited_step']:.2f} ({r['audited_steps']}) | "
                f"{r['p_convicted_within_1000_steps']:.3f} | "
                f"{'never' if steps == float('inf') else f'{steps:,.0f}'} | {pooled} | {ev} |"
            )
    for dtype_name, result in results.items():
        h = result["honest"]
        pooled = (
            f"pooled false convictions {h['pooled_convictions']} (score {h['pooled_mean_score']:.2f}) | | "
            f"{h['adaptive_rate_multiplier']:.3f}"
            if h["pooled_convictions"] is not None
            else " | | 1"
        )
        lines.append(
            f"| honest node | {dtype_name} | 0% | false accusations {h['false_accusations']} of {h['audited_steps']} "
            f"(max deviation {h['max']:.2g}, tolerance {result['tolerance']:.2g}) | | | {pooled} | |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--prefill", type=int, default=8)
    parser.add_argument("--decode", type=int, default=12)
    parser.add_argument("--q", type=float, default=None, help="base audit rate (default: the ledger's)")
    defaults = Settings.model_fields
    parser.add_argument("--gain", type=float, default=defaults["spot_check_gain"].default, help="adaptive rate gain")
    parser.add_argument("--cap", type=float, default=defaults["spot_check_max_fraction"].default, help="rate cap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--honest-rows",
        nargs="*",
        default=None,
        help="only print the honest nodes' audit rate multiplier over pooled_calibration.py's rows (its --json files)",
    )
    args = parser.parse_args()
    if args.q is None:
        args.q = defaults["spot_check_fraction"].default
    if args.honest_rows:
        rows = [row for name in args.honest_rows for row in json.loads(Path(name).read_text())["rows"]]
        for dtype_name in POOLED_DTYPES:
            runs = [r["honest"] for r in rows if r["dtype"] == dtype_name]
            multiplier = honest_rate_multiplier(runs, dtype_name, args.q, args.gain, args.cap)
            print(
                f"{dtype_name}: {sum(map(len, runs))} honest audited steps in {len(runs)} runs: audit rate "
                f"{multiplier:.5f} x q (q = {args.q}, gain {args.gain:g}, cap {args.cap:g})"
            )
        return
    torch.set_num_threads(args.threads)
    head = load_client_head(MODEL)
    results, began = {}, time.time()
    for index, dtype_name in enumerate(args.dtypes):
        results[dtype_name] = run_precision(
            dtype_name,
            head,
            sessions=args.sessions,
            prefill=args.prefill,
            decode=args.decode,
            q=args.q,
            seed=index,
            gain=args.gain,
            cap=args.cap,
        )
        print(f"{dtype_name} done ({time.time() - began:.0f}s)", flush=True)
    print(table(results, args.q))
    if args.json:
        path = Path(args.json)
        if not path.is_absolute() and len(path.parts) == 1:
            path = Path(__file__).parent.parent / "results" / "audit" / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
