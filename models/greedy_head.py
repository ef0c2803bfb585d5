"""Exact greedy tokens from an LM head that reads half its bytes on CPU.

Greedy decoding needs only the index of the largest logit, yet one row times a float32 LM head reads every weight
(32000x512: 65.5 MB, the largest read of a client's decode step). ``LowPrecisionArgmax`` first computes every logit
from a bfloat16 copy of the head, bounds every logit's error, and recomputes in float32 only the vocabulary rows
whose upper bound reaches the best row's lower bound (a few rows). The token it returns is the argmax of the
float32 logits; two logits within float32 rounding of each other could still order either way, as they can between
two BLAS libraries. Where too many rows stay candidates, it computes the whole float32 row instead.

The bound, for input x, head row w and their bfloat16 roundings x', w' (each within 2^-9 of its value, relatively):
    |x.w - x'.w'| <= |x - x'|_2 |w|_2 + |x'|_2 |w - w'|_2 <= |x|_2 (2^-9 max|w|_2 + (1 + 2^-9) max|w - w'|_2)
with the maxima over the vocabulary's rows, measured once; plus float32 accumulation in both products
(n * 2^-24 * |x|_2 |w|_2 each, doubled) and the rounding of the bfloat16 product's result (2^-9 of it, doubled).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 64  # more rows than this left after the bfloat16 pass: one float32 row is cheaper than gathering them
MIN_HEAD_WEIGHTS = 1 << 22  # smaller heads (16 MB) are read fast enough that the bfloat16 pass saves little
BF16_ROUNDING = 2.0 ** -9  # relative error of rounding a float32 to bfloat16 (8 significant bits)
OUTPUT_ROUNDING = 2.0 ** -7  # the bfloat16 product's result is rounded too: 2^-9 of it, bounded with margin
TINY = 1e-30  # bfloat16 subnormals lose relative precision; their absolute error is far below this
NORM_CHUNK = 8192  # vocabulary rows measured at a time when the bound is set up
MIN_GAIN = 1.2  # the bfloat16 route must be this much faster, measured with cold caches, to be chosen


class LowPrecisionArgmax:
    """``argmax(rows @ in_out + bias)`` per row, exactly as float32 would choose, from a bfloat16 pass plus a few
    float32 dot products. ``in_out`` is the head's float32 [hidden, vocab] matrix (kept, not copied)."""

    def __init__(self, in_out: torch.Tensor, bias: Optional[torch.Tensor] = None):
        if in_out.dtype != torch.float32 or in_out.device.type != "cpu":
            raise ValueError(f"the greedy head's check needs a float32 CPU head, got {in_out.dtype} on {in_out.device}")
        self.in_out, self.bias = in_out, bias
        self.low = in_out.to(torch.bfloat16)  # [hidden, vocab], half the bytes
        largest_row = largest_error = 0.0
        for begin in range(0, in_out.shape[1], NORM_CHUNK):  # in slices: no full-size float32 temporary
            rows, low = in_out[:, begin : begin + NORM_CHUNK], self.low[:, begin : begin + NORM_CHUNK]
            largest_row = max(largest_row, float(rows.norm(dim=0).max()))
            largest_error = max(largest_error, float((rows - low.float()).norm(dim=0).max()))
        accumulation = 4 * in_out.shape[0] * 2.0 ** -24  # float32 sums of both products (n * 2^-24 each), doubled
        # |float32 logit - bfloat16 logit| <= |x|_2 * per_norm + |bfloat16 logit| * OUTPUT_ROUNDING (module docstring)
        # the output rounding applies to the product, and |product| <= |logit| + |bias|
        self.bias_term = float(bias.abs().max()) * OUTPUT_ROUNDING if bias is not None else 0.0
        self.per_norm = (BF16_ROUNDING * largest_row + (1 + BF16_ROUNDING) * largest_error
                         + accumulation * largest_row) * (1 + 1e-3)  # 0.1%: the bound's own float math

    def __call__(self, rows: torch.Tensor, full_logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> torch.Tensor:
        """[N, hidden] rows -> [N] token ids; ``full_logits`` computes float32 logits for rows left undecided."""
        rows = rows.float()
        full_logits = full_logits or self.float32_logits
        approx = (rows.to(torch.bfloat16) @ self.low).float()
        if self.bias is not None:
            approx = approx.add_(self.bias)
        # few ops on purpose: each small op costs tens of microseconds when the blocks' weights evicted its code
        bests, norms = approx.amax(dim=1).tolist(), rows.norm(dim=1).tolist()
        tokens = []
        for n, (best, norm) in enumerate(zip(bests, norms)):
            if not (math.isfinite(best) and math.isfinite(norm)):
                tokens.append(int(full_logits(rows[n : n + 1])[0].argmax()))
                continue
            threshold = candidate_threshold(best, norm * self.per_norm + self.bias_term + TINY)
            ids = (approx[n] >= threshold).nonzero().squeeze(1)
            if len(ids) > MAX_CANDIDATES:
                tokens.append(int(full_logits(rows[n : n + 1])[0].argmax()))
                continue
            exact = rows[n] @ self.in_out.index_select(1, ids)  # ids ascend: ties go to the lowest id, as in argmax
            if self.bias is not None:
                exact += self.bias[ids]
            tokens.append(int(ids[exact.argmax()]))
        return torch.tensor(tokens, dtype=torch.long)

    def float32_logits(self, rows: torch.Tensor) -> torch.Tensor:
        logits = rows @ self.in_out
        return logits.add_(self.bias) if self.bias is not None else logits


def candidate_threshold(best: float, shared: float) -> float:
    """The lowest approximate logit a that may still be the float32 argmax, given the best approximate logit ``best``
    and the bound ``shared + |a| * OUTPUT_ROUNDING`` on every logit's error.

    The best row's float32 logit is at least ``low = best - shared - |best| * e``; row a can reach
    ``a + shared + |a| * e``, which grows with a, so a is a candidate iff a + |a| * e >= low - shared."""
    e = OUTPUT_ROUNDING
    target = best - 2 * shared - abs(best) * e
    return target / (1 + e) if target >= 0 else target / (1 - e)


def choose_greedy_argmax(in_out: torch.Tensor, bias: Optional[torch.Tensor],
                         full_logits: Callable[[torch.Tensor], torch.Tensor],
                         final_norm: Callable[[torch.Tensor], torch.Tensor], *,
                         repeats: int = 3) -> Optional[LowPrecisionArgmax]:
    """The bfloat16 route where, for one row, it is faster on this machine than ``full_logits`` + argmax, else None.

    Times both on a normed random row with cold caches (in a decode step, the blocks' weights stream through the
    cache between two uses of the head); ``NECTAR_GREEDY_HEAD=bf16`` or ``=off`` skips the measurement."""
    choice = os.environ.get("NECTAR_GREEDY_HEAD", "auto").lower()
    if choice not in ("auto", "bf16", "off"):
        raise ValueError(f"NECTAR_GREEDY_HEAD must be auto, bf16 or off, got {choice!r}")
    if choice == "off" or in_out.dtype != torch.float32 or in_out.device.type != "cpu":
        return None
    if choice == "auto" and in_out.numel() < MIN_HEAD_WEIGHTS:
        return None
    argmax = LowPrecisionArgmax(in_out, bias)
    if choice == "bf16":
        return argmax
    began = time.perf_counter()
    eviction = eviction_buffer()
    with torch.inference_mode():
        rows = final_norm(torch.randn(1, in_out.shape[0]))
        routes = {"float32": lambda: full_logits(rows).argmax(dim=-1), "bf16": lambda: argmax(rows, full_logits)}
        seconds = {name: [] for name in routes}
        for _ in range(repeats):
            for name, route in routes.items():
                eviction.sum()  # the head's next read comes from memory
                start = time.perf_counter()
                route()
                seconds[name].append(time.perf_counter() - start)
    del eviction
    gain = min(seconds["float32"]) / min(seconds["bf16"])
    chosen = argmax if gain >= MIN_GAIN else None
    logger.info("Greedy head: %s (bfloat16 pass with float32 check %.2fx as fast as float32 logits for one row, "
                "cold; measured in %.2fs)", "bfloat16 pass, float32 check" if chosen else "float32 logits", gain,
                time.perf_counter() - began)
    return chosen


def eviction_buffer() -> torch.Tensor:
    """A buffer twice the size of the last-level cache (at most 256 MB): after reading it, the next read of anything
    else comes mostly from memory."""
    return torch.ones(min(max(2 * _last_level_cache_bytes(), 32 << 20), 256 << 20) // 4)


def _last_level_cache_bytes() -> int:
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=64 << 20)
