"""Signed operator requests: a node proves it is the caller by an EIP-191 signature of its Ethereum key.

The API's operator endpoints (a node's receipts, earnings, settlements, reputation; market stats) answer only to the
admin token or to such a request, so a node sees its own records and nobody else's. The signed text binds the gateway
(its deployment's id, from ``GET /v1/market/gateway``), the method, the path (with its query), the signer, a timestamp
and a random nonce; the server accepts it within ``MAX_SKEW`` seconds of its clock and once per nonce (the caller keeps
the nonce set; see ``check``). Naming the gateway stops a request signed for (or captured by) one gateway from being
replayed at another deployment, whose nonce set never saw it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

HEADER_ADDRESS = "X-Nectar-Address"
HEADER_TIMESTAMP = "X-Nectar-Timestamp"
HEADER_NONCE = "X-Nectar-Nonce"
HEADER_SIGNATURE = "X-Nectar-Signature"
HEADER_GATEWAY = "X-Nectar-Gateway"  # the gateway id signed for; its absence marks the old, gateway-less format
GATEWAY_PATH = "/v1/market/gateway"  # where a signer learns a gateway's id
MAX_SKEW = 60  # seconds a signature is valid either side of the server's clock
NONCE_HEX = 32
GATEWAY_HEX = 32
HOW_TO_SIGN = (
    f"sign anew for this gateway: read its id from GET {GATEWAY_PATH} and sign with "
    f"nectar.wire.request_auth.sign_request(..., gateway=ID) (`nectar operator records` does both)"
)


def _is_hex(text: str, digits: int) -> bool:
    return len(text) == digits and all(c in "0123456789abcdef" for c in text)


def request_message(method: str, path: str, address: str, timestamp: int, nonce: str, *, gateway: str) -> str:
    """The exact text signed (EIP-191 personal_sign); v2 names the gateway (v1, without it, is refused)."""
    return (
        f"Nectar operator request v2\ngateway: {gateway}\nmethod: {method.upper()}\npath: {path}\n"
        f"address: {address.lower()}\ntimestamp: {timestamp}\nnonce: {nonce}"
    )


def sign_request(private_key: str, method: str, path: str, *, gateway: str, now: float | None = None) -> dict[str, str]:
    """Headers that sign ``method path`` (path with its query string, as sent) with a node's key, for the gateway
    whose id is ``gateway`` (``GET /v1/market/gateway``; no other gateway accepts them)."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    if not _is_hex(gateway, GATEWAY_HEX):
        raise ValueError(f"gateway must be a gateway's id ({GATEWAY_HEX} lowercase hex digits from GET {GATEWAY_PATH})")
    account = Account.from_key(private_key)
    timestamp, nonce = int(time.time() if now is None else now), secrets.token_hex(NONCE_HEX // 2)
    message = request_message(method, path, account.address, timestamp, nonce, gateway=gateway)
    signature = Account.sign_message(encode_defunct(text=message), private_key).signature.hex()
    return {
        HEADER_GATEWAY: gateway,
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


def check(method: str, path: str, headers, *, gateway: str, now: float | None = None) -> SignedCaller | None:
    """The signer of a request to the gateway whose id is ``gateway``, or None when it carries no signature headers;
    raises BadSignature when they are wrong, of the old format, or for another gateway. The caller must also refuse a
    nonce it has seen within ``2 * MAX_SKEW`` seconds (replays)."""
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
    signed_for = headers.get(HEADER_GATEWAY)
    if not signed_for:
        raise BadSignature(
            f"an old-format signature (no {HEADER_GATEWAY}: it names no gateway) is refused; {HOW_TO_SIGN}"
        )
    if signed_for != gateway:
        raise BadSignature(
            f"the request was signed for gateway {signed_for[:40]!r}, not this one ({gateway}); {HOW_TO_SIGN}"
        )
    if not is_hex_address(address) or not timestamp.isdigit() or len(timestamp) > 12:
        raise BadSignature(f"{HEADER_ADDRESS} must be an Ethereum address and {HEADER_TIMESTAMP} a Unix time")
    if not _is_hex(nonce, NONCE_HEX):
        raise BadSignature(f"{HEADER_NONCE} must be {NONCE_HEX} lowercase hex digits")
    if len(signature) != 132 or not signature.startswith("0x"):
        raise BadSignature(f"{HEADER_SIGNATURE} must be a 65-byte hex signature (0x + 130 hex digits)")
    skew = abs((time.time() if now is None else now) - int(timestamp))
    if skew > MAX_SKEW:
        raise BadSignature(f"the signature's timestamp is {skew:.0f}s off this server's clock (at most {MAX_SKEW}s)")
    message = request_message(method, path, address, int(timestamp), nonce, gateway=gateway)  # ours, not the header's
    try:
        signer = Account.recover_message(encode_defunct(text=message), signature=signature)
    except Exception as e:
        raise BadSignature(f"unreadable signature: {e}") from None
    if signer.lower() != address.lower():
        raise BadSignature(f"the signature is not {address}'s over this gateway, method, path, timestamp and nonce")
    return SignedCaller(address=to_checksum_address(address), nonce=nonce)


__all__ = ["HEADER_GATEWAY", "GATEWAY_PATH", "BadSignature", "SignedCaller", "check", "request_message", "sign_request"]
