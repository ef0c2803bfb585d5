"""Calibrates the pooled (sequential) audit test per precision on honest runs, and measures how fast it convicts the
small cheats one audited step cannot tell from rounding.

Same replay as ``audit_calibration.py``: an honest node serves sessions with a KV cache (a prefill, then one token
per step), on the CPU or a GPU (``--device``), and the verifier recomputes each step on the CPU with a full causal
forward, in the node's dtype and in float32. Each audited step's score is ``nectar.wire.fingerprints.pooled_score``
(the node's distance to the float32 recomputation over the verifier's own); the CUSUM adds z = log(score) - K
(``pooled_increment``) and convicts at S >= H. For a drift K, the honest increments give theta, the positive root of
mean(exp(theta (z - K))) = 1 (Lundberg); P(an honest CUSUM ever reaches H within N steps) <= N exp(-theta H). The
threshold is H = ln(N / alpha) / theta with N = 10,000 audited steps per node window, alpha = 1e-6, theta the
smallest over all runs of the precision (every model, span and hardware class given) with ``--margin`` added to every
honest log score (an honest node rounding that much worse than the worst measured one is still not accused).

Cheats are replayed on the same steps; for each, the served steps to conviction at audit rate q are simulated
(audits are Bernoulli(q) over served steps, scores drawn from the cheat's observed scores).

    python benchmarks/audit/pooled_calibration.py --json pooled_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from nectar.ledger.core.config import Settings
from nectar.ledger.spot_check import audit_rate
from nectar.models import load_client_head, load_span
from nectar.models.tiny import save_tiny_checkpoint
from nectar.settings import current
from nectar.wire.fingerprints import POOLED_CUSUM, POOLED_SCORE_CLIP, ComputeSpec, pooled_increment, pooled_score

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
WINDOW, ALPHA = 10_000, 1e-6


def fake_int8(span) -> None:
    with torch.no_grad():
        for p in span.parameters():
            if p.dim() == 2:
                scale = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
                p.copy_((p / scale).round().clamp(-127, 127) * scale)


class ServedSpan:
    """The node's own serving path for one span: ``SpanBackend`` rounds (the fused batch runner, on a GPU recorded
    CUDA-graph rounds and the route ``NECTAR_DECODE_ROUTE`` picks, on a CPU the C layer where it applies): what an
    honest node's audited outputs come from. Called like a span module with a cache."""

    def __init__(self, path, start: int, end: int, *, dtype, device: str):
        from nectar.node.backend import SpanBackend

        self.backend = SpanBackend(path, start, end, dtype=dtype, device=device, show_progress=False, batching=True)
        self.start, self.end = start, end

    def new_cache(self, batch_size: int, max_length: int):
        return [self.backend.new_caches(self.start, self.end, batch_size, max_length), 0]

    def __call__(self, hidden, *, cache):
        caches, position = cache
        out = self.backend.inference_step(hidden, caches, start=self.start, end=self.end, position=position)
        cache[1] = position + hidden.shape[1]
        return out


def run(
    name,
    path,
    dtype_name,
    *,
    sessions,
    prefill,
    decode,
    start,
    end,
    embed=None,
    seed=0,
    cheat_every=1,
    device="cpu",
    route="served",
):
    """The node computes on ``device`` (KV-cached steps) through ``route`` ("served": ``ServedSpan``; "generic": the
    blocks' own modules); the verifier recomputes on the CPU, in the node's dtype and in float32. With ``embed`` and a
    span that ends at the model's last block, next tokens are compared too."""
    dtype, spec = DTYPES[dtype_name], ComputeSpec(dtype_name)
    span = load_span(path, start, end, dtype=dtype)
    if route == "served":
        node = ServedSpan(path, start, end, dtype=dtype, device=device)
    else:
        node = load_span(path, start, end, dtype=dtype, device=device) if device != "cpu" else span
    final = embed is not None and end == span32_blocks(path)
    span32 = load_span(path, start, end, dtype=torch.float32)
    int8 = load_span(path, start, end, dtype=dtype)
    fake_int8(int8)
    bf16 = load_span(path, start, end, dtype=torch.bfloat16) if dtype_name == "float16" else None
    prefix = load_span(path, 0, start, dtype=torch.float32) if embed is not None and start > 0 else None
    g = torch.Generator().manual_seed(seed)
    honest, cheats, tokens = [], {}, {}

    def count(key, a, b):
        if final:
            with torch.inference_mode():
                same = embed.logits(a.float()).argmax(-1) == embed.logits(b.float()).argmax(-1)
            tokens.setdefault(key, []).extend(same.reshape(-1).logical_not().tolist())

    for index in range(sessions):
        length = prefill + decode
        if embed is not None:
            x = embed.embed(torch.randint(0, embed.vocab_size, (1, length), generator=g)).float()
            if prefix is not None:
                with torch.inference_mode():
                    x = prefix(x).float()
        else:
            x = torch.randn(1, length, span.hidden_size, generator=g)
        cheating = index % cheat_every == 0
        caches = {"y": node.new_cache(1, length), "int8": int8.new_cache(1, length)}
        if bf16 is not None:
            caches["bf16"] = bf16.new_cache(1, length)
        pos = 0
        for t in [prefill] + [1] * decode:
            step_in = x[:, pos : pos + t]
            with torch.inference_mode():
                y = node(step_in.to(device, dtype), cache=caches["y"]).cpu()
                r = span(x[:, : pos + t].to(dtype))[:, -t:]
                r32 = span32(x[:, : pos + t])[:, -t:]
                honest.append(pooled_score(y, r, r32, spec))
                count("node vs float32", y, r32)
                count("verifier vs float32", r, r32)
                count("node vs verifier", y, r)
                if cheating:
                    m = y.float().abs().mean()
                    out = {
                        f"noise {level:g}% of mean |x|": y.float() + level / 100 * m * torch.randn(y.shape, generator=g)
                        for level in (0.3, 1, 2, 3, 5)
                    }
                    top = y.float().abs().topk(4, dim=-1).indices
                    for level in (1, 5):
                        noisy = y.float() + level / 100 * m * torch.randn(y.shape, generator=g)
                        out[f"top-4 kept, the rest +{level}% noise"] = noisy.scatter(-1, top, y.float().gather(-1, top))
                    out["int8 weights"] = int8(step_in.to(dtype), cache=caches["int8"])
                    if bf16 is not None:
                        out["bfloat16 computed, float16 claimed"] = bf16(
                            step_in.to(torch.bfloat16), cache=caches["bf16"]
                        )
                    for k, v in out.items():
                        cheats.setdefault(k, []).append(pooled_score(v.to(dtype), r, r32, spec))
                        count(f"{k}: vs float32", v.to(dtype), r32)
                        count(f"{k}: vs node", v.to(dtype), y)
            pos += t
    return {
        "model": name,
        "dtype": dtype_name,
        "span": f"{start}:{end}",
        "device": device,
        "route": route if route == "generic" else f"served ({current().decode_route})",
        "honest": honest,
        "cheats": cheats,
        "next_tokens_changed": {k: float(np.mean(v)) for k, v in tokens.items()},
    }


def span32_blocks(path) -> int:
    from nectar.models.resolve import resolve_model  # the checkpoint's depth, for "does the span end the model"

    config = json.loads((resolve_model(path, progress=False) / "config.json").read_text())
    return int(config.get("num_hidden_layers") or config.get("n_layer"))


def increments(scores) -> np.ndarray:
    """What each score adds to the CUSUM before the drift (``pooled_increment``: log of the clipped score)."""
    return np.log(np.clip(np.asarray(scores, dtype=float), 1e-3, POOLED_SCORE_CLIP))


def lundberg_theta(z: np.ndarray, drift: float) -> float:
    """The positive root of mean(exp(theta (z - drift))) = 1 over increments z (inf when none exceeds the drift)."""
    d = np.asarray(z) - drift
    if d.mean() >= 0:
        return 0.0
    if (d <= 0).all():
        return float("inf")
    lo, hi = 1e-6, 1.0
    while np.mean(np.exp(hi * d)) < 1:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(np.exp(mid * d)) < 1 else (lo, mid)
    return lo


def steps_to_conviction(scores, drift, threshold, q, rng, trials=2000, horizon=20_000, caught=None, adaptive=None):
    """Served steps until the node is convicted, per trial: audits are Bernoulli(q) over served steps, each audited
    step drawn from the cheat's observed steps (its pooled score and, with ``caught``, whether the single-step test
    convicted it). inf when not within ``horizon``."""
    scores = increments(scores)
    single = np.zeros(len(scores), dtype=bool) if caught is None else np.asarray(caught, dtype=bool)
    out = []
    for _ in range(trials):
        picks = rng.integers(0, len(scores), size=4000)
        s, served, convicted = 0.0, 0, False
        for i in picks:  # the gap to the next audit: 1/q, or the adaptive rate the CUSUM gives (``audit_rate``)
            rate = q if adaptive is None else audit_rate(q, s / threshold, *adaptive)
            served += int(rng.geometric(rate))
            if served > horizon:
                break
            s = max(0.0, s + scores[i] - drift)
            if single[i] or s >= threshold:
                convicted = True
                break
        out.append(served if convicted else math.inf)
    return np.array(out, dtype=float)


def cusum_convictions(scores, dtype_name: str) -> int:
    """How often the CUSUM in use convicts over these scores taken in order (reset after each conviction)."""
    drift, threshold = POOLED_CUSUM[dtype_name]
    s, convictions = 0.0, 0
    for z in scores:
        s = max(0.0, s + pooled_increment(z) - drift)
        if s >= threshold:
            convictions, s = convictions + 1, 0.0
    return convictions


def summarize(rows, margin, q, seed=0):
    """Per precision: theta, the threshold the honest steps need, their CUSUM peak, and each cheat's conviction odds
    within 1,000 served steps at a fixed rate q and at the ledger's adaptive rate (its default gain and cap)."""
    rng = np.random.default_rng(seed)
    defaults = Settings()
    gain_cap = (defaults.spot_check_gain, defaults.spot_check_max_fraction)
    out = {}
    for dtype_name in DTYPES:
        group = [r for r in rows if r["dtype"] == dtype_name]
        if not group:
            continue
        drift, in_use = POOLED_CUSUM[dtype_name]
        key = lambda r: f"{r['model']}[{r['span']}]@{r.get('device', 'cpu')}"  # noqa: E731
        thetas = {key(r): lundberg_theta(increments(r["honest"]) + margin, drift) for r in group}
        theta = min(thetas.values())
        needed = math.log(WINDOW / ALPHA) / theta if theta > 0 else math.inf
        honest = np.concatenate([increments(r["honest"]) for r in group])
        # the honest CUSUM replayed over every calibration step in order, per run (no conviction allowed)
        convictions, peak = sum(cusum_convictions(r["honest"], dtype_name) for r in group), 0.0
        for r in group:
            s = 0.0
            for z in r["honest"]:
                s = max(0.0, s + pooled_increment(z) - drift)
                peak = max(peak, s)
        cheats = {}
        for name in group[0]["cheats"]:
            scores = np.concatenate([np.array(r["cheats"].get(name, [])) for r in group])
            per_run = {}
            for r in group:
                if name not in r["cheats"]:
                    continue
                steps = steps_to_conviction(r["cheats"][name], drift, in_use, q, rng, trials=400)
                adaptive = steps_to_conviction(r["cheats"][name], drift, in_use, q, rng, trials=400, adaptive=gain_cap)
                per_run[key(r)] = {
                    "mean_score": float(np.mean(r["cheats"][name])),
                    "mean_increment": float(increments(r["cheats"][name]).mean()),
                    "p_convicted_within_1000": float(np.mean(steps <= 1000)),
                    "p_convicted_within_1000_adaptive": float(np.mean(adaptive <= 1000)),
                    "median_served_steps_adaptive": float(np.median(adaptive)),
                }
            cheats[name] = {"mean_score": float(scores.mean()), "runs": per_run}
        out[dtype_name] = {
            "drift_K": drift,
            "threshold_H_in_use": in_use,
            "theta_per_run": thetas,
            "theta_min": theta,
            "threshold_needed": needed,
            "honest_steps": int(honest.size),
            "honest_increment_mean": float(honest.mean()),
            "honest_increment_sd": float(honest.std()),
            "honest_increment_p99": float(np.quantile(honest, 0.99)),
            "honest_increment_max": float(honest.max()),
            "honest_cusum_peak": peak,
            "honest_convictions": int(convictions),
            "cheats": cheats,
            "next_tokens_changed": {
                f"{r['model']}[{r['span']}]": r["next_tokens_changed"] for r in group if r.get("next_tokens_changed")
            },
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-sessions", type=int, default=240)
    parser.add_argument("--builtin-sessions", type=int, default=6)
    parser.add_argument("--decode", type=int, default=14)
    parser.add_argument("--prefill", type=int, default=6)
    parser.add_argument("--margin", type=float, default=0.05, help="added to honest log scores (hardware unmeasured)")
    parser.add_argument("--q", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the node computes (the verifier is on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="another seed gives other sessions (more honest steps)")
    parser.add_argument(
        "--node-route",
        choices=["served", "generic"],
        default="served",
        help="the node's outputs from its serving path (SpanBackend rounds) or the blocks' modules (before stop 33)",
    )
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--builtin-spans", default="0:30,0:10,20:30")
    parser.add_argument("--json", default=None)
    parser.add_argument("--rows", nargs="*", default=None, help="summarize the rows of earlier --json files instead")
    args = parser.parse_args()
    if args.rows:
        rows = [row for name in args.rows for row in json.loads(Path(name).read_text())["rows"]]
        summary = summarize(rows, args.margin, args.q)
        print(json.dumps(summary, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1))
        return
    torch.set_num_threads(args.threads)
    root = Path("/tmp/nectar-audit-calibration")
    tiny = {}
    for kind in ("llama", "mistral", "bloom"):
        path = root / f"tiny-{kind}"
        if not (path / "config.json").exists():
            save_tiny_checkpoint(path, kind, num_layers=4, hidden_size=64)
        tiny[kind] = path
    deep = root / "tiny-llama-16"
    if not (deep / "config.json").exists():
        save_tiny_checkpoint(deep, "llama", num_layers=16, hidden_size=64, seed=1)
    began, rows = time.time(), []
    common = dict(prefill=args.prefill, decode=args.decode, device=args.device, route=args.node_route)
    torch.manual_seed(args.seed)
    for dtype_name in args.dtypes:
        for kind, path in tiny.items():
            rows.append(
                run(
                    f"tiny-{kind}",
                    path,
                    dtype_name,
                    sessions=args.tiny_sessions,
                    start=0,
                    end=4,
                    cheat_every=4,
                    seed=args.seed,
                    **common,
                )
            )
        for start, end in ((0, 16), (6, 10)):
            rows.append(
                run(
                    "tiny-llama-16",
                    deep,
                    dtype_name,
                    sessions=args.tiny_sessions // 4,
                    start=start,
                    end=end,
                    cheat_every=2,
                    seed=args.seed,
                    **common,
                )
            )
        print(f"{dtype_name} tiny done ({time.time() - began:.0f}s)", flush=True)
        if args.builtin_sessions:
            head = load_client_head("smollm2-135m")
            for span in args.builtin_spans.split(","):
                start, end = map(int, span.split(":"))
                rows.append(
                    run(
                        "smollm2-135m",
                        "smollm2-135m",
                        dtype_name,
                        sessions=args.builtin_sessions,
                        start=start,
                        end=end,
                        embed=head,
                        seed=start + 1 + 1000 * args.seed,
                        **common,
                    )
                )
                print(f"{dtype_name} smollm2 {start}:{end} done ({time.time() - began:.0f}s)", flush=True)
    summary = summarize(rows, args.margin, args.q)
    print(json.dumps(summary, indent=1))
    if args.json:
        path = Path(args.json)
        if not path.is_absolute() and len(path.parts) == 1:
            path = Path(__file__).parent.parent / "results" / "audit" / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
