"""Signed operator requests name the gateway they are for (issue 24): a signature made for one gateway is refused by
every other, a rewritten gateway header does not help, and the old format (no gateway) is refused with how to sign
anew. The server-side end to end (two real gateways) is in tests/api/test_gateway_id.py."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account

from nectar.wire.request_auth import HEADER_GATEWAY, BadSignature, check, sign_request
from tests.wire.old_signatures import v1_signed_headers

PATH = "/v1/nodes/0x0000000000000000000000000000000000000001/earnings"


@pytest.fixture
def key() -> str:
    return Account.create().key.hex()


def test_a_signature_is_accepted_by_its_gateway_only(key):
    a, b = secrets.token_hex(16), secrets.token_hex(16)
    headers = sign_request(key, "GET", PATH, gateway=a)
    assert check("GET", PATH, headers, gateway=a).address == Account.from_key(key).address
    with pytest.raises(BadSignature, match=f"signed for gateway '{a}', not this one \\({b}\\).*sign anew"):
        check("GET", PATH, headers, gateway=b)
    # naming the other gateway in the header does not move the signature there: the server checks its own id
    with pytest.raises(BadSignature, match="not .*'s over this gateway"):
        check("GET", PATH, {**headers, HEADER_GATEWAY: b}, gateway=b)


def test_an_old_format_signature_is_refused_with_how_to_sign_anew(key):
    """The v1 text (no gateway) that signers made before: a valid signature of it is still refused."""
    timestamp = 1_800_000_000
    headers = v1_signed_headers(key, PATH, timestamp)
    with pytest.raises(BadSignature, match=r"old-format signature .*GET /v1/market/gateway.*gateway=ID"):
        check("GET", PATH, headers, gateway=secrets.token_hex(16), now=timestamp)


@pytest.mark.parametrize("gateway", ["", "ab", "G" * 32, secrets.token_hex(16).upper()])
def test_sign_request_wants_a_gateway_id(key, gateway):
    with pytest.raises(ValueError, match="GET /v1/market/gateway"):
        sign_request(key, "GET", PATH, gateway=gateway)
