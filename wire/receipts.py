"""Proof-of-inference receipts and payment vouchers: the one home of their schema (see docs/protocol.md).

A node signs a ``Receipt`` for every step it computes; a client signs a cumulative ``Voucher`` per node. Their
EIP-712 digests, signatures and the signing domain live in ``nectar.wire.eip712``; the tensor commitments and
compute descriptor (the receipt's ``fingerprint``: dtype, quantization) live in ``nectar.wire.fingerprints``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Any

from eth_utils import to_checksum_address
from sha3 import keccak_256 as _keccak_256  # safe-pysha3: ~2 us a call, pycryptodome's wrapper ~12 (~8 per step)


def keccak256(data: bytes | bytearray | memoryview) -> bytes:
    return _keccak_256(data).digest()


SESSION_NONCE_BYTES = 32


def bind_session(client_session_id: bytes, nonce: bytes) -> bytes:
    """The session id a node's receipts carry: keccak256(client's id padded to 32 bytes || the node's nonce). The node
    draws the nonce at each open (and each signed forward or backward call) and returns it, so no client can make
    two streams, or a stream before and after a restart, share a work key (session, span, kind, step)."""
    if len(nonce) != SESSION_NONCE_BYTES:
        raise ValueError(f"a session nonce is {SESSION_NONCE_BYTES} bytes, got {len(nonce)}")
    return keccak256(bytes(client_session_id).rjust(32, b"\0") + bytes(nonce))


def work_key(session_id: bytes, block_start: int, block_end: int, kind: int, step: int) -> bytes:
    """16 bytes naming one unit of signed work: two receipts with one key and different outputs are a double-sign
    (``Slashing.slashDoubleSign``), so a node signs at most one receipt per key."""
    return keccak256(session_id + _WORK_KEY.pack(block_start, block_end, kind, step))[:16]


_WORK_KEY = struct.Struct(">HHBQ")


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
    ("session_id", "sessionId"),
    ("step", "step"),
    ("kind", "kind"),
    ("model_id", "modelId"),
    ("block_start", "blockStart"),
    ("block_end", "blockEnd"),
    ("node", "node"),
    ("client", "client"),
    ("tokens", "tokens"),
    ("price", "price"),
    ("amount", "amount"),
    ("input_commitment", "inputCommitment"),
    ("output_commitment", "outputCommitment"),
    ("fingerprint", "fingerprint"),
    ("timestamp", "timestamp"),
]
_BYTES32_FIELDS = ("session_id", "model_id", "input_commitment", "output_commitment", "fingerprint")
_UINT_BITS = {
    "step": 64,
    "kind": 8,
    "block_start": 16,
    "block_end": 16,
    "tokens": 32,
    "price": 128,
    "amount": 128,
    "timestamp": 64,
}


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
    def from_message(cls, message: dict) -> Receipt:
        return cls(**{snake: message[camel] for snake, camel in _RECEIPT_KEYS})

    def to_json(self) -> dict:
        out = {}
        for snake, camel in _RECEIPT_KEYS:
            value = getattr(self, snake)
            out[camel] = (
                _hex(value) if snake in _BYTES32_FIELDS else str(value) if snake in ("price", "amount") else value
            )
        return out

    @classmethod
    def from_json(cls, data: dict) -> Receipt:
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
    partner: str | None = None  # None: the node itself

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
        return {
            "client": self.client,
            "node": self.node,
            "partner": self.partner,
            "channelId": self.channel_id,
            "cumulativeAmount": self.cumulative_amount,
        }

    @classmethod
    def from_message(cls, message: dict) -> Voucher:
        return cls(
            message["client"],
            message["node"],
            message["channelId"],
            message["cumulativeAmount"],
            message.get("partner"),
        )

    def to_json(self) -> dict:
        return {**self.to_message(), "cumulativeAmount": str(self.cumulative_amount)}

    @classmethod
    def from_json(cls, data: dict) -> Voucher:
        if not isinstance(data, dict):
            raise ValueError("a voucher must be a JSON object")
        missing = [k for k in ("client", "node", "partner", "channelId", "cumulativeAmount") if k not in data]
        if missing:
            raise ValueError(f"voucher is missing fields: {', '.join(missing)}")
        return cls(
            data["client"],
            data["node"],
            _as_int("channelId", data["channelId"]),
            _as_int("cumulativeAmount", data["cumulativeAmount"]),
            data["partner"],
        )


@dataclass(frozen=True)
class SignedReceipt:
    receipt: Receipt
    signature: bytes  # 65 bytes r || s || v (v = 27 or 28)

    def to_json(self) -> dict:
        return {"receipt": self.receipt.to_json(), "signature": _hex(self.signature)}

    @classmethod
    def from_json(cls, data: dict) -> SignedReceipt:
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
    def from_json(cls, data: dict) -> SignedVoucher:
        if not isinstance(data, dict) or "voucher" not in data or "signature" not in data:
            raise ValueError("a signed voucher is {'voucher': {...}, 'signature': '0x...'}")
        return cls(Voucher.from_json(data["voucher"]), _unhex("signature", data["signature"], 65))


def channel_slot(node: str, partner: str, channel_id: int) -> tuple[str, str, int]:
    """The storage slot a channel shares on chain (Settlement, NectarTypes.channelSlot) as (lo, hi, k): channels
    2k and 2k + 1 of one node when ``partner == node``, else the channels with this id to the two nodes, sorted."""
    node, partner = node.lower(), partner.lower()
    if node == partner:
        return node, node, channel_id >> 1
    return min(node, partner), max(node, partner), channel_id


def model_id_hash(model_name: str) -> bytes:
    return keccak256(model_name.encode("utf-8"))


__all__ = [
    "ReceiptKind",
    "Receipt",
    "SESSION_NONCE_BYTES",
    "bind_session",
    "work_key",
    "Voucher",
    "SignedReceipt",
    "SignedVoucher",
    "model_id_hash",
    "keccak256",
    "checksum_address",
    "channel_slot",
]
