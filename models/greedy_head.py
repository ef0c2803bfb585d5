"""Exact greedy tokens from an LM head that reads a half or a quarter of its bytes on CPU.

Greedy decoding needs only the index of the largest logit, yet one row times a float32 LM head reads every weight
(32000x512: 65.5 MB, the largest read of a client's decode step). ``LowPrecisionArgmax`` first computes every logit
from a low-precision copy of the head (bfloat16, or int8 with a bfloat16 scale per vocabulary row), bounds every
logit's error, and recomputes in float32 only the vocabulary rows whose upper bound reaches the best row's lower
bound (a few rows). The token it returns is the argmax of the float32 logits; two logits within float32 rounding of
each other could still order either way, as they can between two BLAS libraries. Where too many rows stay
candidates, it computes the whole float32 row instead.

The bound, for input x, head row w, the bfloat16 rounding x' of x (within 2^-9 of it, relatively) and the copy's
row w' (bfloat16 rounding, or scale * int8):
    |x.w - x'.w'| <= |x - x'|_2 |w|_2 + |x'|_2 |w - w'|_2 <= |x|_2 (2^-9 max|w|_2 + (1 + 2^-9) max|w - w'|_2)
with the maxima over the vocabulary's rows, measured once; plus float32 accumulation in both products
(n * 2^-24 * |x|_2 |w|_2 each, doubled) and the rounding of the low-precision product's bfloat16 result (2^-9 of
it, doubled). Both products accumulate in float32: MKL's bfloat16 GEMM, and PyTorch's int8 weight-only kernel
(``_weight_int8pack_mm``: int8 * scale is exact in float32, then float32 FMAs, one rounding of the sum). Where
nectar's C kernels build (``nectar.models.native``), the int8 pass runs through ``nectar_int8_logits`` instead: one
sequential pass over the int8 rows with the float32 input itself (no bfloat16 rounding of x, none of the result), so
the same bound covers it with room to spare; on the AMD EPYC VM it took 0.95-1.2 instead of 1.5 ms for 32000x512
with cold caches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nectar.settings import current

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 64  # more rows than this left after the low-precision pass: one float32 row is cheaper than them
MIN_HEAD_WEIGHTS = 1 << 22  # smaller heads (16 MB) are read fast enough that a low-precision pass saves little
BF16_ROUNDING = 2.0**-9  # relative error of rounding a float32 to bfloat16 (8 significant bits)
OUTPUT_ROUNDING = 2.0**-7  # the low-precision product's bfloat16 result is rounded too: 2^-9 of it, with margin
TINY = 1e-30  # bfloat16 subnormals lose relative precision; their absolute error is far below this
NORM_CHUNK = 8192  # vocabulary rows measured at a time when the bound is set up
MIN_GAIN = 1.2  # a low-precision route must be this much faster, measured with cold caches, to be chosen
FORMATS = ("bf16", "int8")
MAX_REFINED = 4096  # int8 candidates narrowed by the bfloat16 rows at most (16 MB of a 4096-wide head)
INT8_K_MULTIPLE = 16  # the int8 kernel reads 16 inputs at a time with aligned loads: other widths give wrong sums


class LowPrecisionArgmax:
    """``argmax(rows @ in_out + bias)`` per row, exactly as float32 would choose, from a low-precision pass
    (``format``: "bf16" or "int8") plus a few float32 dot products. ``in_out`` is the head's float32
    [hidden, vocab] matrix (kept, not copied).

    int8's bound is about 3x bfloat16's, so on wide heads its pass can leave hundreds of candidates; a bfloat16 copy
    in [vocab, hidden] layout then narrows them (reading a few hundred rows) before the float32 check."""

    def __init__(self, in_out: torch.Tensor, bias: torch.Tensor | None = None, format: str = "bf16"):
        if in_out.dtype != torch.float32 or in_out.device.type != "cpu":
            raise ValueError(f"the greedy head's check needs a float32 CPU head, got {in_out.dtype} on {in_out.device}")
        if format not in FORMATS:
            raise ValueError(f"the greedy head's low-precision format must be one of {FORMATS}, got {format!r}")
        if format == "int8" and not int8_supported(in_out.shape[0]):
            raise ValueError(
                f"the int8 greedy head needs torch._weight_int8pack_mm and a hidden size that is a "
                f"multiple of {INT8_K_MULTIPLE} (got {in_out.shape[0]}); use NECTAR_GREEDY_HEAD=bf16"
            )
        self.in_out, self.bias, self.format = in_out, bias, format
        hidden, vocab = in_out.shape
        self.refine_rows: torch.Tensor | None = None
        if format == "bf16":
            self.low = in_out.to(torch.bfloat16)  # [hidden, vocab], half the bytes
        else:  # [vocab, hidden] as the kernel reads it, a quarter of the bytes, and a bfloat16 scale per row
            self.low = torch.empty(vocab, hidden, dtype=torch.int8)
            self.scales = torch.empty(vocab, dtype=torch.bfloat16)
            self.int8_logits = _int8_kernel()  # None: PyTorch's int8 kernel computes the pass
            self.refine_rows = torch.empty(vocab, hidden, dtype=torch.bfloat16)
        largest_row = largest_error = largest_bf16_error = 0.0
        for begin in range(0, vocab, NORM_CHUNK):  # in slices: no full-size float32 temporary
            rows = in_out[:, begin : begin + NORM_CHUNK]
            rounded = self.low[:, begin : begin + NORM_CHUNK] if format == "bf16" else rows.to(torch.bfloat16)
            largest_row = max(largest_row, float(rows.norm(dim=0).max()))
            largest_bf16_error = max(largest_bf16_error, float((rows - rounded.float()).norm(dim=0).max()))
            if format == "int8":
                self.refine_rows[begin : begin + rows.shape[1]] = rounded.t()
                largest_error = max(largest_error, float((rows - self._quantize_slice(rows, begin)).norm(dim=0).max()))
        if format == "bf16":
            largest_error = largest_bf16_error
        # |float32 logit - approximate logit| <= |x|_2 * per_norm + |approximate logit| * OUTPUT_ROUNDING (docstring)
        # the output rounding applies to the product, and |product| <= |logit| + |bias|
        self.bias_term = float(bias.abs().max()) * OUTPUT_ROUNDING if bias is not None else 0.0
        self.per_norm = _per_norm(hidden, largest_row, largest_error)
        self.refine_per_norm = _per_norm(hidden, largest_row, largest_bf16_error)

    def _quantize_slice(self, rows: torch.Tensor, begin: int) -> torch.Tensor:
        """Quantizes [hidden, n] float32 head rows into ``low``/``scales`` from ``begin``; returns their [hidden, n]
        dequantized values (scale * int8, exact in float32)."""
        scales = (rows.abs().amax(dim=0) / 127).to(torch.bfloat16)
        scales[scales == 0] = 1  # an all-zero row: any scale gives zeros
        wide = scales.float()
        quantized = torch.round(rows / wide).clamp_(-127, 127)
        self.low[begin : begin + rows.shape[1]] = quantized.t().to(torch.int8)
        self.scales[begin : begin + rows.shape[1]] = scales
        return quantized * wide

    def approximate(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, hidden] float32 rows -> [N, vocab] float32 approximate logits, bias included."""
        if self.format == "int8" and self.int8_logits is not None:
            return self._native_int8(rows)
        low_rows = rows.to(torch.bfloat16)
        if self.format == "int8":
            approx = torch._weight_int8pack_mm(low_rows.contiguous(), self.low, self.scales).float()
        else:
            approx = (low_rows @ self.low).float()
        return approx.add_(self.bias) if self.bias is not None else approx

    def _native_int8(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float().contiguous()
        vocab, hidden = self.low.shape
        out = torch.empty(rows.shape[0], vocab)
        bias = self.bias.float().contiguous() if self.bias is not None else None
        for n in range(rows.shape[0]):
            self.int8_logits(
                rows[n].data_ptr(),
                self.low.data_ptr(),
                self.scales.data_ptr(),
                bias.data_ptr() if bias is not None else None,
                out[n].data_ptr(),
                vocab,
                hidden,
            )
        return out

    def __call__(
        self, rows: torch.Tensor, full_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """[N, hidden] rows -> [N] token ids; ``full_logits`` computes float32 logits for rows left undecided."""
        rows = rows.float()
        full_logits = full_logits or self.float32_logits
        approx = self.approximate(rows)
        # few ops on purpose: each small op costs tens of microseconds when the blocks' weights evicted its code
        bests, norms = approx.amax(dim=1).tolist(), rows.norm(dim=1).tolist()
        tokens = []
        for n, (best, norm) in enumerate(zip(bests, norms)):
            if not (math.isfinite(best) and math.isfinite(norm)):
                tokens.append(int(full_logits(rows[n : n + 1])[0].argmax()))
                continue
            threshold = candidate_threshold(best, norm * self.per_norm + self.bias_term + TINY)
            ids = (approx[n] >= threshold).nonzero().squeeze(1)
            if len(ids) > MAX_CANDIDATES and self.refine_rows is not None and len(ids) <= MAX_REFINED:
                ids = self._refine(rows[n], norm, ids)
            if len(ids) > MAX_CANDIDATES:
                tokens.append(int(full_logits(rows[n : n + 1])[0].argmax()))
                continue
            exact = rows[n] @ self.in_out.index_select(1, ids)  # ids ascend: ties go to the lowest id, as in argmax
            if self.bias is not None:
                exact += self.bias[ids]
            tokens.append(int(ids[exact.argmax()]))
        return torch.tensor(tokens, dtype=torch.long)

    def _refine(self, row: torch.Tensor, norm: float, ids: torch.Tensor) -> torch.Tensor:
        """The candidates ``ids`` that can still win under the bfloat16 bound (the float32 argmax is among ``ids``,
        so the best of them bounds it from below)."""
        approx = self.refined_logits(row[None], ids)[0]
        threshold = candidate_threshold(float(approx.max()), norm * self.refine_per_norm + self.bias_term + TINY)
        return ids[approx >= threshold]

    def refined_logits(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """[N, hidden] rows -> [N, len(ids)] (every vocabulary row without ``ids``) logits from the int8 pass's
        bfloat16 rows, bias included."""
        weights = self.refine_rows if ids is None else self.refine_rows.index_select(0, ids)
        approx = (rows.to(torch.bfloat16) @ weights.t()).float()
        if self.bias is not None:
            approx += self.bias if ids is None else self.bias[ids]
        return approx

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


def _per_norm(hidden: int, largest_row: float, largest_error: float) -> float:
    """The bound's factor of |x|_2 (module docstring), from the largest row norm and the largest row error."""
    accumulation = 4 * hidden * 2.0**-24  # float32 sums of both products (n * 2^-24 each), doubled
    return (BF16_ROUNDING * largest_row + (1 + BF16_ROUNDING) * largest_error + accumulation * largest_row) * (
        1 + 1e-3
    )  # 0.1%: the bound's own float math


def _int8_kernel():
    """``nectar_int8_logits`` from nectar's C kernels, or None where they do not build."""
    from nectar.models.cpu_blas import native_kernel

    library = native_kernel()
    return library.nectar_int8_logits if library is not None else None


def int8_supported(hidden: int) -> bool:
    """Whether PyTorch's int8 weight-only kernel can take a head of this hidden size on this CPU build."""
    return hasattr(torch, "_weight_int8pack_mm") and hidden % INT8_K_MULTIPLE == 0


def choose_greedy_argmax(
    in_out: torch.Tensor,
    bias: torch.Tensor | None,
    full_logits: Callable[[torch.Tensor], torch.Tensor],
    final_norm: Callable[[torch.Tensor], torch.Tensor],
    *,
    repeats: int = 3,
) -> LowPrecisionArgmax | None:
    """The fastest low-precision route where, for one row, it beats ``full_logits`` + argmax on this machine by
    ``MIN_GAIN``, else None.

    Times every route on a normed random row with cold caches (in a decode step, the blocks' weights stream through
    the cache between two uses of the head); ``NECTAR_GREEDY_HEAD=bf16``, ``=int8`` or ``=off`` skips the
    measurement."""
    choice = current().greedy_head  # NECTAR_GREEDY_HEAD, validated by nectar.settings
    if choice == "off" or in_out.dtype != torch.float32 or in_out.device.type != "cpu":
        return None
    if choice == "auto" and in_out.numel() < MIN_HEAD_WEIGHTS:
        return None
    began = time.perf_counter()
    formats = [choice] if choice in FORMATS else [f for f in FORMATS if f != "int8" or int8_supported(in_out.shape[0])]
    candidates = {f: LowPrecisionArgmax(in_out, bias, format=f) for f in formats}
    with torch.inference_mode():
        rows = final_norm(torch.randn(4, in_out.shape[0], generator=torch.Generator().manual_seed(0)))
        exact = full_logits(rows)
        for name, argmax in list(candidates.items()):
            try:
                problem = None if bound_holds(argmax, rows, exact) else "broke its error bound"
            except (RuntimeError, NotImplementedError) as e:  # a PyTorch build without the kernel
                problem = f"failed ({e})"
            if problem is not None:  # a kernel that does not compute what the bound assumes, or none at all
                if choice == name:
                    raise RuntimeError(
                        f"the {name} greedy head {problem} on this machine; set NECTAR_GREEDY_HEAD=auto or off"
                    )
                logger.warning("Greedy head: the %s pass %s on this machine; not using it", name, problem)
                del candidates[name]
    if choice in FORMATS:
        return candidates[choice]
    eviction = eviction_buffer()
    with torch.inference_mode():
        row = rows[:1]
        routes = {"float32": lambda: full_logits(row).argmax(dim=-1)}
        routes.update({name: (lambda a=argmax: a(row, full_logits)) for name, argmax in candidates.items()})
        seconds = {name: [] for name in routes}
        for _ in range(repeats):
            for name, route in routes.items():
                eviction.sum()  # the head's next read comes from memory
                start = time.perf_counter()
                route()
                seconds[name].append(time.perf_counter() - start)
    del eviction
    gains = {name: min(seconds["float32"]) / min(seconds[name]) for name in candidates}
    fastest = max(gains, key=gains.get, default=None)
    chosen = candidates[fastest] if fastest and gains[fastest] >= MIN_GAIN else None
    logger.info(
        "Greedy head: %s (for one row, cold, as fast as float32 logits: %s; measured in %.2fs)",
        f"{fastest} pass, float32 check" if chosen else "float32 logits",
        ", ".join(f"{name} pass with float32 check {gain:.2f}x" for name, gain in gains.items()),
        time.perf_counter() - began,
    )
    return chosen


def bound_holds(argmax: LowPrecisionArgmax, rows: torch.Tensor, exact: torch.Tensor) -> bool:
    """Whether every approximate logit of ``rows`` (the pass's, and the refining rows' where int8 has them) lies
    within its bound of the float32 logit ``exact``."""
    passes = [(argmax.approximate(rows), argmax.per_norm)]
    if argmax.refine_rows is not None:
        passes.append((argmax.refined_logits(rows), argmax.refine_per_norm))
    norms = rows.norm(dim=1, keepdim=True)
    return all(
        bool(
            (
                (approx - exact).abs() <= norms * per_norm + argmax.bias_term + TINY + approx.abs() * OUTPUT_ROUNDING
            ).all()
        )
        for approx, per_norm in passes
    )


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
