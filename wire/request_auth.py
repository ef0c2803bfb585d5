"""Signed operator requests: a node proves it is the caller by an EIP-191 signature of its Ethereum key.

The API's operator endpoints (a node's receipts, earnings, settlements, reputation; market stats) answer only to the
admin token or to such a request, so a node sees its own records and nobody else's. The signed text binds the method,
the path (with its query), the signer, a timestamp and a random nonce; the server accepts it within ``MAX_SKEW``
seconds of its clock and once per nonce (the caller keeps the nonce set; see ``check``).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

HEADER_ADDRESS = "X-Nectar-Address"
HEADER_TIMESTAMP = "X-Nectar-Timestamp"
HEADER_NONCE = "X-Nectar-Nonce"
HEADER_SIGNATURE = "X-Nectar-Signature"
MAX_SKEW = 60  # seconds a signature is valid either side of the server's clock
NONCE_HEX = 32


def request_message(method: str, path: str, address: str, timestamp: int, nonce: str) -> str:
    """The exact text signed (EIP-191 personal_sign)."""
    return (
        f"Nectar operator request\nmethod: {method.upper()}\npath: {path}\naddress: {address.lower()}\n"
        f"timestamp: {timestamp}\nnonce: {nonce}"
    )


def sign_request(private_key: str, method: str, path: str, *, now: float | None = None) -> dict[str, str]:
    """Headers that sign ``method path`` (path with its query string, as sent) with a node's key."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    account = Account.from_key(private_key)
    timestamp, nonce = int(time.time() if now is None else now), secrets.token_hex(NONCE_HEX // 2)
    message = request_message(method, path, account.address, timestamp, nonce)
    signature = Account.sign_message(encode_defunct(text=message), private_key).signature.hex()
    return {
        HEADER_ADDRESS: account.address,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: signature if signature.startswith("0x") else "0x" + signature,
    }


@dataclass(frozen=True)
class SignedCaller:
    address: str  # checksummed
    nonce: str


class BadSignature(ValueError):
    """The request's signature headers are missing, malformed, stale, or not the named address's."""


def check(method: str, path: str, headers, *, now: float | None = None) -> SignedCaller | None:
    """The signer of a request, or None when it carries no signature headers; raises BadSignature when they are
    wrong. The caller must also refuse a nonce it has seen within ``2 * MAX_SKEW`` seconds (replays)."""
    from eth_account import Account
    from eth_account.messages import encode_defunct
    from eth_utils import is_hex_address, to_checksum_address

    values = [headers.get(h) for h in (HEADER_ADDRESS, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)]
    if not any(values):
        return None
    address, timestamp, nonce, signature = values
    if not all(values):
        raise BadSignature(
            f"a signed request needs all of {HEADER_ADDRESS}, {HEADER_TIMESTAMP}, {HEADER_NONCE}, {HEADER_SIGNATURE}"
        )
    if not is_hex_address(address) or not timestamp.isdigit() or len(timestamp) > 12:
        raise BadSignature(f"{HEADER_ADDRESS} must be an Ethereum address and {HEADER_TIMESTAMP} a Unix time")
    if len(nonce) != NONCE_HEX or any(c not in "0123456789abcdef" for c in nonce):
        raise BadSignature(f"{HEADER_NONCE} must be {NONCE_HEX} lowercase hex digits")
    if len(signature) != 132 or not signature.startswith("0x"):
        raise BadSignature(f"{HEADER_SIGNATURE} must be a 65-byte hex signature (0x + 130 hex digits)")
    skew = abs((time.time() if now is None else now) - int(timestamp))
    if skew > MAX_SKEW:
        raise BadSignature(f"the signature's timestamp is {skew:.0f}s off this server's clock (at most {MAX_SKEW}s)")
    message = request_message(method, path, address, int(timestamp), nonce)
    try:
        signer = Account.recover_message(encode_defunct(text=message), signature=signature)
    except Exception as e:
        raise BadSignature(f"unreadable signature: {e}") from None
    if signer.lower() != address.lower():
        raise BadSignature(f"the signature is not {address}'s over this method, path, timestamp and nonce")
    return SignedCaller(address=to_checksum_address(address), nonce=nonce)


__all__ = ["BadSignature", "SignedCaller", "check", "request_message", "sign_request"]
