"""Proof-of-inference receipts and payment vouchers: the one home of their schema (see docs/protocol.md).

A node signs a ``Receipt`` for every step it computes; a client signs a cumulative ``Voucher`` per node. Both are
EIP-712 typed data over the same domain. The digest is computed here directly (cached domain separator and type
hashes, C keccak) and signed/recovered with coincurve, which is several times faster than eth-account's
generic path while giving byte-identical signatures (tests cross-check against ``Account.sign_typed_data``).

Also here: tensor commitments (``commit_tensor``) that chain the hops of a route, and TOPLOC-like activation
fingerprints (``activation_fingerprint``) that spot checks compare within a per-dtype tolerance.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import asdict, dataclass
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import coincurve
import numpy as np
import torch
from eth_utils import to_checksum_address
from sha3 import keccak_256 as _keccak_256  # safe-pysha3: ~2 us a call, pycryptodome's wrapper ~12 (~8 per step)

logger = logging.getLogger(__name__)

ZERO_ADDRESS = "0x" + "00" * 20
DEVNET_CHAIN_ID = 31337
# secp256k1 group order; signatures with s above half of it are malleable copies and are rejected (as OpenZeppelin).
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N = _SECP256K1_N // 2

RECEIPT_TYPE = (
    "Receipt(bytes32 sessionId,uint64 step,uint8 kind,bytes32 modelId,uint16 blockStart,uint16 blockEnd,"
    "address node,address client,uint32 tokens,uint128 price,uint128 amount,bytes32 inputCommitment,"
    "bytes32 outputCommitment,bytes32 fingerprint,uint64 timestamp)"
)
VOUCHER_TYPE = "Voucher(address client,address node,address partner,uint64 channelId,uint128 cumulativeAmount)"
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"


def keccak256(data: bytes | bytearray | memoryview) -> bytes:
    return _keccak_256(data).digest()


RECEIPT_TYPEHASH = keccak256(RECEIPT_TYPE.encode())
VOUCHER_TYPEHASH = keccak256(VOUCHER_TYPE.encode())
DOMAIN_TYPEHASH = keccak256(DOMAIN_TYPE.encode())


def _fields(type_string: str) -> list[tuple[str, str]]:
    inner = type_string[type_string.index("(") + 1 : -1]
    return [(part.split(" ")[1], part.split(" ")[0]) for part in inner.split(",")]


# eth-account's full-message format, used by callers that want the generic path (and by the cross-check tests).
EIP712_TYPES = {
    "EIP712Domain": [{"name": n, "type": t} for n, t in _fields(DOMAIN_TYPE)],
    "Receipt": [{"name": n, "type": t} for n, t in _fields(RECEIPT_TYPE)],
    "Voucher": [{"name": n, "type": t} for n, t in _fields(VOUCHER_TYPE)],
}


class InvalidSignature(ValueError):
    """A signature that is not 65 bytes, has a bad v, a malleable s, or does not recover to any key."""


class ReceiptKind(IntEnum):
    INFERENCE = 0
    FORWARD = 1
    BACKWARD = 2


# ---------------------------------------------------------------------------------------------------- field checks
def _check_uint(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be an integer in [0, 2**{bits}), got {value!r}")


def _check_bytes32(name: str, value: bytes) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes, got {value!r:.80}")


@lru_cache(maxsize=65536)
def _checksum_cached(value: str) -> str:
    return to_checksum_address(value)


def checksum_address(value: str, name: str = "address") -> str:
    """``value`` as an EIP-55 checksummed address; a ValueError naming ``name`` if it is not one."""
    if not isinstance(value, str) or len(value) != 42:
        raise ValueError(f"{name} must be a 20-byte hex address, got {value!r:.80}")
    try:
        return _checksum_cached(value)
    except Exception:
        raise ValueError(f"{name} must be a 20-byte hex address, got {value!r:.80}") from None


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def _unhex(name: str, value: Any, length: int | None = 32) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str):
        text = value[2:] if value[:2] in ("0x", "0X") else value
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"{name} must be hex, got {value!r:.80}") from None
    else:
        raise ValueError(f"{name} must be a hex string, got {type(value).__name__}")
    if length is not None and len(raw) != length:
        raise ValueError(f"{name} must be {length} bytes, got {len(raw)}")
    return raw


def _as_int(name: str, value: Any) -> int:
    # JSON carries uint128 amounts as decimal strings (JavaScript numbers lose precision past 2**53).
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{name} must be an integer or a decimal string, got {value!r:.80}")


# ---------------------------------------------------------------------------------------------------- dataclasses
_RECEIPT_KEYS = [
    ("session_id", "sessionId"), ("step", "step"), ("kind", "kind"), ("model_id", "modelId"),
    ("block_start", "blockStart"), ("block_end", "blockEnd"), ("node", "node"), ("client", "client"),
    ("tokens", "tokens"), ("price", "price"), ("amount", "amount"), ("input_commitment", "inputCommitment"),
    ("output_commitment", "outputCommitment"), ("fingerprint", "fingerprint"), ("timestamp", "timestamp"),
]  # fmt: skip
_BYTES32_FIELDS = ("session_id", "model_id", "input_commitment", "output_commitment", "fingerprint")
_UINT_BITS = {"step": 64, "kind": 8, "block_start": 16, "block_end": 16, "tokens": 32, "price": 128, "amount": 128,
              "timestamp": 64}  # fmt: skip


@dataclass(frozen=True)
class Receipt:
    """What a node did for a client in one step: signed by the node, checked by the client and the ledger."""

    session_id: bytes
    step: int
    kind: int
    model_id: bytes
    block_start: int
    block_end: int
    node: str
    client: str
    tokens: int
    price: int
    amount: int
    input_commitment: bytes
    output_commitment: bytes
    fingerprint: bytes
    timestamp: int

    def __post_init__(self):
        for name in _BYTES32_FIELDS:
            _check_bytes32(name, getattr(self, name))
            object.__setattr__(self, name, bytes(getattr(self, name)))
        for name, bits in _UINT_BITS.items():
            _check_uint(name, getattr(self, name), bits)
        if self.kind not in tuple(ReceiptKind):
            raise ValueError(f"kind must be one of {[int(k) for k in ReceiptKind]}, got {self.kind}")
        object.__setattr__(self, "kind", int(self.kind))
        if self.block_start >= self.block_end:
            raise ValueError(f"block span [{self.block_start}, {self.block_end}) is empty")
        object.__setattr__(self, "node", checksum_address(self.node, "node"))
        object.__setattr__(self, "client", checksum_address(self.client, "client"))

    @property
    def key(self) -> tuple:
        """Identity of the work done: two receipts with one key and different outputs are a double-sign."""
        return (self.session_id, self.node, self.kind, self.step, self.block_start, self.block_end)

    def to_message(self) -> dict:
        return {camel: getattr(self, snake) for snake, camel in _RECEIPT_KEYS}

    @classmethod
    def from_message(cls, message: dict) -> "Receipt":
        return cls(**{snake: message[camel] for snake, camel in _RECEIPT_KEYS})

    def to_json(self) -> dict:
        out = {}
        for snake, camel in _RECEIPT_KEYS:
            value = getattr(self, snake)
            out[camel] = _hex(value) if snake in _BYTES32_FIELDS else str(value) if snake in ("price", "amount") else value
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Receipt":
        if not isinstance(data, dict):
            raise ValueError("a receipt must be a JSON object")
        missing = [camel for _, camel in _RECEIPT_KEYS if camel not in data]
        if missing:
            raise ValueError(f"receipt is missing fields: {', '.join(missing)}")
        kwargs = {}
        for snake, camel in _RECEIPT_KEYS:
            value = data[camel]
            if snake in _BYTES32_FIELDS:
                kwargs[snake] = _unhex(camel, value)
            elif snake in ("node", "client"):
                kwargs[snake] = value
            else:
                kwargs[snake] = _as_int(camel, value)
        return cls(**kwargs)


@dataclass(frozen=True)
class Voucher:
    """A client's promise to pay a node ``cumulative_amount`` in total on one channel (later vouchers supersede).

    A channel is (client, node, partner, channel_id). ``partner`` names the channel that shares its storage slot on
    chain: another node of the client's route with the same channel id, or the node itself (the default), whose
    channel ``channel_id ^ 1`` then shares the slot. Settling both channels of a slot in one batch saves ~2,400 gas
    per voucher (docs/protocol.md).
    """

    client: str
    node: str
    channel_id: int
    cumulative_amount: int
    partner: Optional[str] = None  # None: the node itself

    def __post_init__(self):
        _check_uint("channel_id", self.channel_id, 64)
        _check_uint("cumulative_amount", self.cumulative_amount, 128)
        object.__setattr__(self, "client", checksum_address(self.client, "client"))
        object.__setattr__(self, "node", checksum_address(self.node, "node"))
        partner = self.node if self.partner is None else checksum_address(self.partner, "partner")
        object.__setattr__(self, "partner", partner)

    @property
    def channel(self) -> tuple[str, str, str, int]:
        """The channel this voucher pays on: (client, node, partner, channel id)."""
        return self.client, self.node, self.partner, self.channel_id

    def to_message(self) -> dict:
        return {"client": self.client, "node": self.node, "partner": self.partner, "channelId": self.channel_id,
                "cumulativeAmount": self.cumulative_amount}  # fmt: skip

    @classmethod
    def from_message(cls, message: dict) -> "Voucher":
        return cls(message["client"], message["node"], message["channelId"], message["cumulativeAmount"],
                   message.get("partner"))  # fmt: skip

    def to_json(self) -> dict:
        return {**self.to_message(), "cumulativeAmount": str(self.cumulative_amount)}

    @classmethod
    def from_json(cls, data: dict) -> "Voucher":
        if not isinstance(data, dict):
            raise ValueError("a voucher must be a JSON object")
        missing = [k for k in ("client", "node", "partner", "channelId", "cumulativeAmount") if k not in data]
        if missing:
            raise ValueError(f"voucher is missing fields: {', '.join(missing)}")
        return cls(data["client"], data["node"], _as_int("channelId", data["channelId"]),
                   _as_int("cumulativeAmount", data["cumulativeAmount"]), data["partner"])  # fmt: skip


@dataclass(frozen=True)
class SignedReceipt:
    receipt: Receipt
    signature: bytes  # 65 bytes r || s || v (v = 27 or 28)

    def to_json(self) -> dict:
        return {"receipt": self.receipt.to_json(), "signature": _hex(self.signature)}

    @classmethod
    def from_json(cls, data: dict) -> "SignedReceipt":
        if not isinstance(data, dict) or "receipt" not in data or "signature" not in data:
            raise ValueError("a signed receipt is {'receipt': {...}, 'signature': '0x...'}")
        return cls(Receipt.from_json(data["receipt"]), _unhex("signature", data["signature"], 65))


@dataclass(frozen=True)
class SignedVoucher:
    voucher: Voucher
    signature: bytes

    def to_json(self) -> dict:
        return {"voucher": self.voucher.to_json(), "signature": _hex(self.signature)}

    @classmethod
    def from_json(cls, data: dict) -> "SignedVoucher":
        if not isinstance(data, dict) or "voucher" not in data or "signature" not in data:
            raise ValueError("a signed voucher is {'voucher': {...}, 'signature': '0x...'}")
        return cls(Voucher.from_json(data["voucher"]), _unhex("signature", data["signature"], 65))


# ---------------------------------------------------------------------------------------------------- EIP-712
def default_domain() -> dict:
    """The domain of the running devnet/deployment if its file exists, else chainId 31337 and the zero address."""
    from nectar.paths import deployment_path  # local import: keeps the module importable without a nectar home

    path = Path(deployment_path())
    if path.exists():
        try:
            data = json.loads(path.read_text())
            chain_id = int(data.get("chainId", data.get("chain_id", DEVNET_CHAIN_ID)))
            contracts = data.get("contracts", {})
            settlement = contracts.get("Settlement", data.get("settlement", ZERO_ADDRESS))
            if isinstance(settlement, dict):
                settlement = settlement.get("address", ZERO_ADDRESS)
            return make_domain(chain_id, settlement)
        except (ValueError, TypeError, AttributeError) as e:
            logger.warning(f"Ignoring unreadable deployment file {path} ({e}); using the devnet default domain")
    return make_domain(DEVNET_CHAIN_ID, ZERO_ADDRESS)


def make_domain(chain_id: int, verifying_contract: str) -> dict:
    return {"name": "Nectar", "version": "1", "chainId": int(chain_id),
            "verifyingContract": to_checksum_address(verifying_contract)}  # fmt: skip


@lru_cache(maxsize=64)
def _domain_separator_cached(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak256(
        DOMAIN_TYPEHASH
        + keccak256(name.encode())
        + keccak256(version.encode())
        + chain_id.to_bytes(32, "big")
        + bytes(12)
        + bytes.fromhex(verifying_contract[2:])
    )


def domain_separator(domain: dict) -> bytes:
    return _domain_separator_cached(
        domain["name"], domain["version"], int(domain["chainId"]), domain["verifyingContract"].lower()
    )


@lru_cache(maxsize=4096)
def _address_word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


def receipt_struct_hash(receipt: Receipt) -> bytes:
    r = receipt
    return keccak256(
        b"".join((
            RECEIPT_TYPEHASH,
            r.session_id,
            r.step.to_bytes(32, "big"),
            r.kind.to_bytes(32, "big"),
            r.model_id,
            r.block_start.to_bytes(32, "big"),
            r.block_end.to_bytes(32, "big"),
            _address_word(r.node),
            _address_word(r.client),
            r.tokens.to_bytes(32, "big"),
            r.price.to_bytes(32, "big"),
            r.amount.to_bytes(32, "big"),
            r.input_commitment,
            r.output_commitment,
            r.fingerprint,
            r.timestamp.to_bytes(32, "big"),
        ))
    )  # fmt: skip


def channel_slot(node: str, partner: str, channel_id: int) -> tuple[str, str, int]:
    """The storage slot a channel shares on chain (Settlement, NectarTypes.channelSlot) as (lo, hi, k): channels
    2k and 2k + 1 of one node when ``partner == node``, else the channels with this id to the two nodes, sorted."""
    node, partner = node.lower(), partner.lower()
    if node == partner:
        return node, node, channel_id >> 1
    return min(node, partner), max(node, partner), channel_id


def voucher_struct_hash(voucher: Voucher) -> bytes:
    v = voucher
    return keccak256(
        VOUCHER_TYPEHASH + _address_word(v.client) + _address_word(v.node) + _address_word(v.partner)
        + v.channel_id.to_bytes(32, "big") + v.cumulative_amount.to_bytes(32, "big")
    )  # fmt: skip


def _typed_digest(domain: dict, struct_hash: bytes) -> bytes:
    return keccak256(b"\x19\x01" + domain_separator(domain) + struct_hash)


def receipt_digest(receipt: Receipt, domain: dict) -> bytes:
    return _typed_digest(domain, receipt_struct_hash(receipt))


def voucher_digest(voucher: Voucher, domain: dict) -> bytes:
    return _typed_digest(domain, voucher_struct_hash(voucher))


def receipt_leaf(receipt: Receipt) -> bytes:
    """Merkle leaf of a receipt: keccak256(hashStruct(receipt)) (protocol.md)."""
    return keccak256(receipt_struct_hash(receipt))


def model_id_hash(model_name: str) -> bytes:
    return keccak256(model_name.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------- signatures
@lru_cache(maxsize=256)
def _private_key(private_key: bytes) -> coincurve.PrivateKey:
    return coincurve.PrivateKey(private_key)


def _key_bytes(private_key: bytes | str) -> bytes:
    if hasattr(private_key, "key"):  # an eth_account LocalAccount
        private_key = private_key.key
    if isinstance(private_key, str):
        private_key = _unhex("private_key", private_key, 32)
    return bytes(private_key)


def sign_digest(digest: bytes, private_key: bytes | str) -> bytes:
    """65-byte Ethereum signature r || s || v over a 32-byte digest (coincurve always produces low s)."""
    raw = _private_key(_key_bytes(private_key)).sign_recoverable(digest, hasher=None)
    return raw[:64] + bytes([raw[64] + 27])


def recover_digest_signer(digest: bytes, signature: bytes) -> str:
    """Checksum address that signed ``digest``; raises ``InvalidSignature`` for malformed or malleable signatures."""
    if len(signature) != 65:
        raise InvalidSignature(f"signature must be 65 bytes, got {len(signature)}")
    v = signature[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        raise InvalidSignature(f"signature has an invalid recovery byte {signature[64]}")
    s = int.from_bytes(signature[32:64], "big")
    if s == 0 or s > _HALF_N or int.from_bytes(signature[:32], "big") == 0:
        raise InvalidSignature("signature has a zero r/s or a malleable (high) s")
    try:
        public = coincurve.PublicKey.from_signature_and_message(signature[:64] + bytes([v]), digest, hasher=None)
    except Exception as e:
        raise InvalidSignature(f"signature does not recover to a public key ({e})") from None
    return _address_from_public(public.format(compressed=False))


@lru_cache(maxsize=4096)
def _address_from_public(uncompressed: bytes) -> str:
    return to_checksum_address(keccak256(uncompressed[1:])[12:])


def address_of(private_key: bytes | str) -> str:
    return _address_from_public(_private_key(_key_bytes(private_key)).public_key.format(compressed=False))


def sign_receipt(receipt: Receipt, private_key: bytes | str, domain: dict) -> SignedReceipt:
    return SignedReceipt(receipt, sign_digest(receipt_digest(receipt, domain), private_key))


def recover_receipt_signer(signed: SignedReceipt, domain: dict) -> str:
    return recover_digest_signer(receipt_digest(signed.receipt, domain), signed.signature)


def sign_voucher(voucher: Voucher, private_key: bytes | str, domain: dict) -> SignedVoucher:
    return SignedVoucher(voucher, sign_digest(voucher_digest(voucher, domain), private_key))


def recover_voucher_signer(signed: SignedVoucher, domain: dict) -> str:
    return recover_digest_signer(voucher_digest(signed.voucher, domain), signed.signature)


def full_typed_message(primary_type: str, message: dict, domain: dict) -> dict:
    """The message in eth-account's ``full_message`` form (for wallets and cross-checks)."""
    types = {"EIP712Domain": EIP712_TYPES["EIP712Domain"], primary_type: EIP712_TYPES[primary_type]}
    return {"types": types, "primaryType": primary_type, "domain": domain, "message": message}


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
    "ReceiptKind", "Receipt", "Voucher", "SignedReceipt", "SignedVoucher", "InvalidSignature", "default_domain",
    "make_domain", "domain_separator", "sign_receipt", "recover_receipt_signer", "sign_voucher",
    "recover_voucher_signer", "receipt_struct_hash", "receipt_digest", "voucher_struct_hash", "voucher_digest",
    "receipt_leaf", "model_id_hash", "commit_tensor", "activation_fingerprint", "parse_fingerprint",
    "fingerprints_match", "fingerprint_hash", "address_of", "keccak256", "EIP712_TYPES", "full_typed_message",
    "checksum_address", "channel_slot",
]  # fmt: skip
