"""Test-side signers built on eth-account's generic EIP-712 path, independent of nectar.wire and nectar.chain."""

from __future__ import annotations

from eth_account import Account

VOUCHER_TYPES = {
    "Voucher": [
        {"name": "client", "type": "address"},
        {"name": "node", "type": "address"},
        {"name": "partner", "type": "address"},
        {"name": "channelId", "type": "uint64"},
        {"name": "cumulativeAmount", "type": "uint128"},
    ]
}
RECEIPT_FIELDS = [
    ("sessionId", "bytes32"),
    ("step", "uint64"),
    ("kind", "uint8"),
    ("modelId", "bytes32"),
    ("blockStart", "uint16"),
    ("blockEnd", "uint16"),
    ("node", "address"),
    ("client", "address"),
    ("tokens", "uint32"),
    ("price", "uint128"),
    ("amount", "uint128"),
    ("inputCommitment", "bytes32"),
    ("outputCommitment", "bytes32"),
    ("fingerprint", "bytes32"),
    ("timestamp", "uint64"),
]
RECEIPT_TYPES = {"Receipt": [{"name": n, "type": t} for n, t in RECEIPT_FIELDS]}


def sign_voucher(domain: dict, private_key: str, voucher: dict) -> bytes:
    message = {"types": VOUCHER_TYPES, "primaryType": "Voucher", "domain": domain, "message": voucher}
    return bytes(Account.sign_typed_data(private_key, full_message=message).signature)


def sign_receipt(domain: dict, private_key: str, receipt: dict) -> bytes:
    message = {"types": RECEIPT_TYPES, "primaryType": "Receipt", "domain": domain, "message": receipt}
    return bytes(Account.sign_typed_data(private_key, full_message=message).signature)


def voucher(client: str, node: str, channel_id: int, cumulative: int, partner: str | None = None) -> dict:
    """A voucher message; ``partner`` defaults to the node itself (its channel pairs with ``channel_id ^ 1``)."""
    return {
        "client": client,
        "node": node,
        "partner": partner or node,
        "channelId": channel_id,
        "cumulativeAmount": cumulative,
    }
