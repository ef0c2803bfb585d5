"""The v1 operator-request signature (no gateway line) that signers made before request-auth v2: gateways must
refuse it (tests/wire/test_request_auth.py, tests/api/test_gateway_id.py)."""

from __future__ import annotations

import secrets

from eth_account import Account
from eth_account.messages import encode_defunct

from nectar.wire import request_auth


def v1_signed_headers(key: str, path: str, timestamp: int) -> dict[str, str]:
    """Headers of a valid v1 signature of ``GET path`` by ``key``."""
    address, nonce = Account.from_key(key).address, secrets.token_hex(16)
    old = (
        f"Nectar operator request\nmethod: GET\npath: {path}\naddress: {address.lower()}\n"
        f"timestamp: {timestamp}\nnonce: {nonce}"
    )
    signature = "0x" + Account.sign_message(encode_defunct(text=old), key).signature.hex().removeprefix("0x")
    return {
        request_auth.HEADER_ADDRESS: address,
        request_auth.HEADER_TIMESTAMP: str(timestamp),
        request_auth.HEADER_NONCE: nonce,
        request_auth.HEADER_SIGNATURE: signature,
    }
