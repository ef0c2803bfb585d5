"""What a receipt commits to: tensor commitments that chain the hops of a route (``commit_tensor``) and TOPLOC-like
activation fingerprints (``activation_fingerprint``) that spot checks compare within a per-dtype tolerance."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
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


# ---------------------------------------------------------------------------------------------------- fingerprints
# Layout: magic "NF1", k (uint8), tokens n (uint32 LE), then per token k uint16 indices and k float16 values.
_FP_MAGIC = b"NF1"
_FP_HEADER = struct.Struct("<3sBI")


def activation_fingerprint(t: torch.Tensor, k: int = 4) -> bytes:
    """TOPLOC-like fingerprint: per token of a [B, T, H] tensor, the top-k |value| indices and their values.

    4 * k bytes per token (16 for k = 4), in (batch, position) order.
    """
    if t.dim() != 3:
        raise ValueError(f"activation_fingerprint expects [batch, tokens, hidden], got shape {tuple(t.shape)}")
    hidden = t.shape[-1]
    if not 0 < k <= min(hidden, 255) or hidden > 65536:
        raise ValueError(f"need 0 < k <= min(hidden, 255) and hidden <= 65536, got k={k}, hidden={hidden}")
    # numpy, not torch: a node computes this on its event loop while its compute thread runs torch ops, and torch's
    # small ops there cost several times more (dispatch, the shared intra-op pool)
    flat = t.detach().to("cpu", torch.float32).reshape(-1, hidden).numpy()
    magnitude = np.abs(flat)
    top = np.argpartition(magnitude, hidden - k, axis=-1)[:, hidden - k :]  # the k largest, in no order
    # largest first; equal magnitudes by index, so the same tensor always gives the same bytes
    order = np.lexsort((top, -np.take_along_axis(magnitude, top, axis=-1)), axis=-1)
    indices = np.take_along_axis(top, order, axis=-1)
    values = np.take_along_axis(flat, indices, axis=-1)
    body = np.concatenate([indices.astype("<u2").view(np.uint8), values.astype("<f2").view(np.uint8)], axis=-1)
    return _FP_HEADER.pack(_FP_MAGIC, k, flat.shape[0]) + body.tobytes()


def parse_fingerprint(fp: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [n, k] int64, values [n, k] float32) of a fingerprint; ValueError if malformed."""
    if len(fp) < _FP_HEADER.size:
        raise ValueError("fingerprint is shorter than its header")
    magic, k, n = _FP_HEADER.unpack_from(fp)
    if magic != _FP_MAGIC or k == 0 or len(fp) != _FP_HEADER.size + n * k * 4:
        raise ValueError("fingerprint has a bad header or length")
    body = torch.frombuffer(bytearray(fp[_FP_HEADER.size :]), dtype=torch.uint8).reshape(n, 4 * k) if n else None
    if body is None:
        return torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k)
    indices = body[:, : 2 * k].contiguous().view(torch.uint16).to(torch.int64)
    values = body[:, 2 * k :].contiguous().view(torch.float16).to(torch.float32)
    return indices, values


@dataclass(frozen=True)
class FingerprintTolerance:
    rtol: float  # relative to the token's largest |value|
    max_bad_token_fraction: float  # tokens allowed to differ (near-ties, accumulation order)


# Calibrated on KV-cached steps vs a full causal recompute (tests/wire/test_fingerprint.py): float32 differs by ~1e-6
# relative, which the fingerprint's float16 rounding (one ulp ~ 1e-3) dominates; half types accumulate ~1e-2.
TOLERANCES = {
    torch.float32: FingerprintTolerance(rtol=4e-3, max_bad_token_fraction=0.01),
    torch.float64: FingerprintTolerance(rtol=4e-3, max_bad_token_fraction=0.01),
    torch.float16: FingerprintTolerance(rtol=1.5e-2, max_bad_token_fraction=0.03),
    torch.bfloat16: FingerprintTolerance(rtol=4e-2, max_bad_token_fraction=0.05),
}


def fingerprints_match(a: bytes, b: bytes, *, dtype: torch.dtype) -> bool:
    """Whether two fingerprints describe the same activations up to the dtype's floating-point noise.

    Per token: at least k-1 of the top-k indices agree (a near-tie may swap the last one) and the shared values agree
    within ``rtol`` of the token's largest |value|. A small fraction of tokens may fail (see ``TOLERANCES``).
    """
    try:
        ia, va = parse_fingerprint(a)
        ib, vb = parse_fingerprint(b)
    except ValueError:
        return False
    if ia.shape != ib.shape:
        return False
    n, k = ia.shape
    if n == 0:
        return True
    tol = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    same = ia.unsqueeze(-1) == ib.unsqueeze(-2)  # [n, k, k]: index i of a equals index j of b
    overlap = same.any(-1).sum(-1)
    scale = torch.maximum(va.abs().amax(-1), vb.abs().amax(-1)).clamp_min(1e-6)
    vb_at_a = (same.float() * vb.unsqueeze(-2)).sum(-1)  # b's value at each of a's indices (0 if absent)
    close = ((va - vb_at_a).abs() <= tol.rtol * scale.unsqueeze(-1)) | ~same.any(-1)
    good = (overlap >= k - 1) & close.all(-1)
    bad = int((~good).sum())
    return bad <= int(tol.max_bad_token_fraction * n)


def fingerprint_hash(fp: bytes) -> bytes:
    return keccak256(fp)


__all__ = [
    "commit_tensor",
    "activation_fingerprint",
    "parse_fingerprint",
    "FingerprintTolerance",
    "TOLERANCES",
    "fingerprints_match",
    "fingerprint_hash",
]
