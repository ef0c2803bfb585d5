"""Calldata encoding for Settlement and Slashing: vouchers grouped per client with EIP-2098 compact signatures,
and receipts as the contract's struct tuple. Pure functions, no web3."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _message(obj: Any) -> Mapping[str, Any]:
    """Accepts a protocol dict (camelCase or snake_case keys) or an object with ``to_message()`` (nectar.wire)."""
    if hasattr(obj, "to_message"):
        return obj.to_message()
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a dict or a wire object, got {type(obj).__name__}")
    return obj


def _field(message: Mapping[str, Any], camel: str, snake: str) -> Any:
    if camel in message:
        return message[camel]
    if snake in message:
        return message[snake]
    raise ValueError(f"missing field {camel!r}")


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value, 0)
    raise ValueError(f"expected an integer, got {value!r}")


def as_bytes32(value: Any) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}")
    return raw


def as_signature(value: Any) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)
    if len(raw) != 65:
        raise ValueError(f"expected a 65-byte r||s||v signature, got {len(raw)} bytes")
    return raw


@dataclass(frozen=True)
class VoucherFields:
    client: str
    node: str
    partner: str
    channel_id: int
    cumulative_amount: int


def voucher_fields(voucher: Any) -> VoucherFields:
    m = _message(voucher)
    node = to_checksum_address(_field(m, "node", "node"))
    v = VoucherFields(
        client=to_checksum_address(_field(m, "client", "client")),
        node=node,
        partner=to_checksum_address(m.get("partner") or node),
        channel_id=as_int(_field(m, "channelId", "channel_id")),
        cumulative_amount=as_int(_field(m, "cumulativeAmount", "cumulative_amount")),
    )
    if not 0 <= v.channel_id < 2**64:
        raise ValueError(f"channelId {v.channel_id} does not fit uint64")
    if not 0 <= v.cumulative_amount < 2**128:
        raise ValueError(f"cumulativeAmount {v.cumulative_amount} does not fit uint128")
    return v


def compact_signature(signature: Any) -> tuple[bytes, bytes]:
    """65-byte r||s||v -> EIP-2098 (r, vs). High-s signatures are refused: the chain rejects them too."""
    sig = as_signature(signature)
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        raise ValueError(f"signature v must be 27/28 (or 0/1), got {sig[64]}")
    if s == 0 or s > SECP256K1_N // 2:
        raise ValueError("signature has a zero or high s (malleable); sign with a standard library")
    return r, (v << 255 | s).to_bytes(32, "big")


@dataclass(frozen=True)
class SettleBatch:
    """Arguments of ``Settlement.settle`` plus, per batch position, the caller's original voucher index."""

    nodes: list[str]
    groups: list[tuple[str, list[tuple[int, bytes, bytes]]]]
    order: list[int]  # order[batch_position] = index in the caller's list


def encode_settle_batch(vouchers: Sequence[tuple[Any, Any]]) -> SettleBatch:
    """Groups (voucher, 65-byte signature) pairs per client and lists each node (and partner) once, as ``settle``
    expects."""
    if not vouchers:
        raise ValueError("settle needs at least one voucher")
    node_index: dict[str, int] = {}
    by_client: dict[str, list[tuple[int, tuple[int, bytes, bytes]]]] = {}
    for i, (voucher, signature) in enumerate(vouchers):
        try:
            v = voucher_fields(voucher)
            r, vs = compact_signature(signature)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"voucher {i}: {exc}") from exc
        idx = node_index.setdefault(v.node, len(node_index))
        partner_idx = node_index.setdefault(v.partner, len(node_index))
        if max(idx, partner_idx) >= 2**16:
            raise ValueError("a batch may name at most 65,536 distinct nodes")
        packed = idx << 224 | partner_idx << 192 | v.channel_id << 128 | v.cumulative_amount
        by_client.setdefault(v.client, []).append((i, (packed, r, vs)))
    groups, order = [], []
    for client, items in by_client.items():
        groups.append((client, [item for _, item in items]))
        order.extend(i for i, _ in items)
    return SettleBatch(nodes=list(node_index), groups=groups, order=order)


def decode_settle_batch(nodes: Sequence[str], groups: Sequence[Any]) -> list[dict[str, Any]]:
    """The vouchers inside ``settle`` calldata (as decoded by web3), for indexers reading settlements from chain."""
    out = []
    for group in groups:
        client, items = (group["client"], group["vouchers"]) if isinstance(group, Mapping) else group
        for item in items:
            packed = item["packed"] if isinstance(item, Mapping) else item[0]
            out.append(
                {
                    "client": to_checksum_address(client),
                    "node": to_checksum_address(nodes[packed >> 224]),
                    "partner": to_checksum_address(nodes[(packed >> 192) & (2**32 - 1)]),
                    "channelId": (packed >> 128) & (2**64 - 1),
                    "cumulativeAmount": packed & (2**128 - 1),
                }
            )
    return out


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def receipt_tuple(receipt: Any, components: Sequence[Mapping[str, Any]]) -> tuple:
    """A receipt (protocol dict, its JSON form, or a nectar.wire Receipt) as the contract's ``Receipt`` tuple.

    :param components: the struct's ABI components (name and type, in order), read from the forge artifact: the field
        list has one home (docs/protocol.md, nectar.wire.receipts, the contract), never a copy here
    """
    m = _message(receipt)
    out = []
    for component in components:
        camel, kind = component["name"], component["type"]
        value = _field(m, camel, _snake(camel))
        if kind == "bytes32":
            out.append(as_bytes32(value))
        elif kind == "address":
            out.append(to_checksum_address(value))
        elif kind.startswith("uint"):
            out.append(as_int(value))
        else:
            raise ValueError(f"unexpected receipt field type {kind} for {camel}")
    return tuple(out)
