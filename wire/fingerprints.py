"""What a receipt commits to: tensor commitments that chain the hops of a route (``commit_tensor``; the output's is
what an audited node must reveal its whole output against) and the compute descriptor (``ComputeSpec``: dtype,
quantization, device class) that audits recompute with, comparing every coordinate within the precision's
calibrated tolerance (``outputs_match``)."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
from sha3 import keccak_256 as _keccak_256

from nectar.wire.receipts import keccak256


# ---------------------------------------------------------------------------------------------------- commitments
def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def commit_tensor(t: torch.Tensor) -> bytes:
    """keccak256(b"<dtype>|<d0>,<d1>,...|" + raw little-endian bytes): the same on both sides for the same tensor."""
    header = f"{str(t.dtype).removeprefix('torch.')}|{','.join(map(str, t.shape))}|".encode()
    hasher = _keccak_256()
    hasher.update(header)
    hasher.update(_raw_bytes(t))
    return hasher.digest()


# ---------------------------------------------------------------------------------------------------- compute
# What a receipt's ``fingerprint`` field commits to: how the node computed (dtype, weight quantization, device class),
# 8 bytes per receipt. Audits recompute in the same precision and judge with that precision's calibrated tolerance;
# the evidence itself is the node's whole output, kept by the node and revealed against the receipt's output
# commitment when a step is audited (docs/protocol.md, "Spot checks").
# Layout: magic "NC1", dtype code, quantization code, device class, two reserved zero bytes. A step computed with a
# LoRA adapter sets the first reserved byte to 1 and appends the adapter's 32-byte digest (sha256 of its config and
# weights files, ``nectar.models.adapters``): 40 bytes, so the receipt binds which adapter was computed with.
_CD_MAGIC = b"NC1"
_CD = struct.Struct("<3sBBB2s")
_WITH_ADAPTER = b"\x01\0"
ADAPTER_DIGEST_BYTES = 32
DTYPES = {1: "float32", 2: "bfloat16", 3: "float16"}
# none: weights as the checkpoint stores them, cast to the dtype; int8 and nf4: bitsandbytes' weight-only int8 and
# 4-bit NormalFloat, one recipe on every device (nectar.models.quant)
QUANTIZATIONS = {0: "none", 1: "int8", 2: "nf4"}
DEVICE_CLASSES = {0: "cpu", 1: "cuda", 2: "other"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _code(table: dict[int, str], name: str, what: str) -> int:
    for code, known in table.items():
        if known == name:
            return code
    raise ValueError(f"unknown {what} {name!r}: one of {', '.join(table.values())}")


@dataclass(frozen=True)
class ComputeSpec:
    """How a node computes its span: what an auditor must reproduce to compare like with like."""

    dtype: str = "float32"
    quantization: str = "none"
    device: str = "cpu"
    adapter: bytes = b""  # the LoRA adapter's digest (32 bytes) the step was computed with; b"": none

    def __post_init__(self):
        _code(DTYPES, self.dtype, "dtype")
        _code(QUANTIZATIONS, self.quantization, "quantization")
        _code(DEVICE_CLASSES, self.device, "device class")
        if not isinstance(self.adapter, bytes) or len(self.adapter) not in (0, ADAPTER_DIGEST_BYTES):
            raise ValueError(f"an adapter digest is {ADAPTER_DIGEST_BYTES} bytes (or none)")

    @classmethod
    def of(cls, dtype: torch.dtype | str, device: torch.device | str = "cpu", quantization: str = "none"):
        kind = torch.device(device).type
        return cls(str(dtype).removeprefix("torch."), quantization, kind if kind in ("cpu", "cuda") else "other")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def encode(self) -> bytes:
        return (
            _CD.pack(
                _CD_MAGIC,
                _code(DTYPES, self.dtype, "dtype"),
                _code(QUANTIZATIONS, self.quantization, "quantization"),
                _code(DEVICE_CLASSES, self.device, "device class"),
                _WITH_ADAPTER if self.adapter else b"\0\0",
            )
            + self.adapter
        )

    @classmethod
    def decode(cls, raw: bytes) -> ComputeSpec:
        """ValueError unless ``raw`` is exactly a known descriptor (an unknown precision cannot be audited)."""
        if len(raw) not in (_CD.size, _CD.size + ADAPTER_DIGEST_BYTES):
            raise ValueError(f"a compute descriptor is {_CD.size} bytes (+ {ADAPTER_DIGEST_BYTES}), got {len(raw)}")
        magic, dtype, quantization, device, reserved = _CD.unpack(raw[: _CD.size])
        adapter = raw[_CD.size :]
        if magic != _CD_MAGIC or reserved != (_WITH_ADAPTER if adapter else b"\0\0"):
            raise ValueError("not a compute descriptor (bad magic or reserved bytes)")
        if dtype not in DTYPES or quantization not in QUANTIZATIONS or device not in DEVICE_CLASSES:
            raise ValueError(f"unknown dtype/quantization/device codes {dtype}/{quantization}/{device}")
        return cls(DTYPES[dtype], QUANTIZATIONS[quantization], DEVICE_CLASSES[device], bytes(adapter))


def fingerprint_hash(fp: bytes) -> bytes:
    """The receipt's ``fingerprint`` field: keccak of the compute descriptor (of b"" for steps with no output rows)."""
    return keccak256(fp)


# ---------------------------------------------------------------------------------------------------- comparison
def output_deviation(claimed: torch.Tensor, recomputed: torch.Tensor) -> float:
    """How far a node's revealed output is from a recomputation: per token, the mean absolute difference over ALL
    hidden coordinates divided by the recomputation's mean absolute value; the worst token. inf on a shape
    mismatch or a non-finite value (an honest output has neither)."""
    if tuple(claimed.shape) != tuple(recomputed.shape) or claimed.dim() != 3:
        return float("inf")
    hidden = claimed.shape[-1]
    a = claimed.detach().to("cpu", torch.float64).reshape(-1, hidden)
    b = recomputed.detach().to("cpu", torch.float64).reshape(-1, hidden)
    if a.numel() == 0:
        return 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    per_token = (a - b).abs().mean(-1) / b.abs().mean(-1).clamp_min(1e-12)
    return float(per_token.max())


# Largest honest ``output_deviation`` allowed, per precision, for one block; a span of n blocks gets sqrt(n) times
# that (an honest difference, another reduction order: KV-cached steps vs a full recompute, other batch shapes,
# grows with the span's depth, about as sqrt(n) on the runs measured). From benchmarks/audit/audit_calibration.py on
# the built-in model and tiny models, with the node on a CPU and on an H100 (the verifier on a CPU; method and numbers
# in docs/protocol.md and benchmarks/RESULTS.md): twice the largest, over all runs and both hardware classes, of the
# fitted 1e-6 tail quantile (or the observed maximum, if larger) over sqrt(n). float16 is set by the H100 (1.59e-3,
# the CPU's 1.4e-3), bfloat16 by the CPU. float32 keeps a wider margin (5x the CPU's, 10x the H100's): its honest
# differences (~1e-6) are far below any cheat that changes next tokens anyway.
TOLERANCE_PER_SQRT_BLOCK = {"float32": 1e-5, "float16": 3.2e-3, "bfloat16": 2.6e-2}


def tolerance(spec: ComputeSpec, blocks: int) -> float:
    """The largest ``output_deviation`` an honest node computing ``blocks`` blocks in ``spec`` is allowed."""
    return TOLERANCE_PER_SQRT_BLOCK[spec.dtype] * math.sqrt(max(1, blocks))


def outputs_match(claimed: torch.Tensor, recomputed: torch.Tensor, spec: ComputeSpec, blocks: int) -> bool:
    """Whether a revealed output agrees with a recomputation in the node's own precision."""
    return output_deviation(claimed, recomputed) <= tolerance(spec, blocks)


# ---------------------------------------------------------------------------------------------------- pooled test
# One audited step cannot tell a few percent of noise from bfloat16's own rounding (two honest 30-block runs differ by
# 1-3%), nor float16 over deep spans. The pooled test sums a per-step score over a node's audited steps (per node and
# compute descriptor) in a one-sided CUSUM. The score is self-normalising, so one threshold serves every model and
# depth: how far the node's output is from a float32 recomputation, over how far the verifier's own recomputation in
# the node's precision is from it (an honest node's rounding is the verifier's rounding: about 1; noise adds to it).
# float32 needs no pooling: its honest differences are ~1e-6 and every cheat fails one step.
POOLED_DTYPES = ("bfloat16", "float16")
POOLED_SCORE_CLIP = 4.0  # scores are clipped to [1e-3, CLIP] (a gross cheat fails its single step anyway)
# The CUSUM adds log(score) - K per audited step: the log keeps an honest step whose verifier happened to round little
# (a small denominator, a large ratio) from weighing like a cheat, so the honest tail is light and K can sit just
# above 0. K and H per precision from benchmarks/audit/pooled_calibration.py over CPU and H100 nodes (method and
# numbers in docs/protocol.md): H >= ln(N / alpha) / theta, theta the Lundberg root of mean(exp(theta (z - K))) = 1
# over honest log scores z raised by 0.05 (an honest node rounding 5% worse than the worst measured one), the smallest
# over all calibration runs; N = 10,000 audited steps per node window and alpha = 1e-6: an honest node is accused with
# probability below 1e-6 per window.
POOLED_CUSUM = {"bfloat16": (0.1, 6.5), "float16": (0.1, 6.6)}
_FLOOR = {"bfloat16": 2.0**-10, "float16": 2.0**-13, "float32": 2.0**-26}  # half a unit roundoff: no zero divides


def mean_deviation(claimed: torch.Tensor, reference: torch.Tensor) -> float:
    """Per token, mean |difference| over all hidden coordinates / the reference's mean |value|; the mean over tokens
    (inf on a shape mismatch or a non-finite value)."""
    if tuple(claimed.shape) != tuple(reference.shape) or claimed.dim() != 3:
        return float("inf")
    hidden = claimed.shape[-1]
    a = claimed.detach().to("cpu", torch.float64).reshape(-1, hidden)
    b = reference.detach().to("cpu", torch.float64).reshape(-1, hidden)
    if a.numel() == 0:
        return 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float(((a - b).abs().mean(-1) / b.abs().mean(-1).clamp_min(1e-12)).mean())


def pooled_score(claimed: torch.Tensor, recomputed: torch.Tensor, reference: torch.Tensor, spec: ComputeSpec) -> float:
    """One audited step's score for the pooled test: the node's distance to a float32 recomputation (``reference``)
    over the verifier's recomputation in the node's precision (``recomputed``) to it; clipped to
    [0, POOLED_SCORE_CLIP]."""
    own = max(mean_deviation(recomputed, reference), _FLOOR[spec.dtype])
    return min(POOLED_SCORE_CLIP, mean_deviation(claimed, reference) / own)


def pooled_increment(score: float) -> float:
    """What one audited step adds to the CUSUM before the drift: log of the clipped score (0 for a typical honest
    step, log 4 at most)."""
    return math.log(min(max(score, 1e-3), POOLED_SCORE_CLIP))


def cusum_step(statistic: float, score: float, spec: ComputeSpec) -> tuple[float, bool]:
    """The CUSUM after one more audited step: (max(0, S + log(score) - K), whether it reached H)."""
    drift, threshold = POOLED_CUSUM[spec.dtype]
    statistic = max(0.0, statistic + pooled_increment(score) - drift)
    return statistic, statistic >= threshold


__all__ = [
    "commit_tensor",
    "ComputeSpec",
    "DTYPES",
    "QUANTIZATIONS",
    "ADAPTER_DIGEST_BYTES",
    "DEVICE_CLASSES",
    "fingerprint_hash",
    "output_deviation",
    "TOLERANCE_PER_SQRT_BLOCK",
    "tolerance",
    "outputs_match",
    "POOLED_DTYPES",
    "POOLED_SCORE_CLIP",
    "POOLED_CUSUM",
    "mean_deviation",
    "pooled_score",
    "pooled_increment",
    "cusum_step",
]
