"""The contracts and nectar.wire agree on every hash of docs/protocol.md: domain, voucher and receipt digests, receipt
leaves; and a voucher signed by nectar.wire settles on chain."""

from __future__ import annotations

import pytest

from nectar.wire import eip712
from nectar.wire import receipts as wire

ETHER = 10**18


@pytest.fixture(scope="module")
def domain(chain):
    return eip712.make_domain(chain.chain_id, chain.address_of("Settlement"))


def _receipt(node: str, client: str) -> wire.Receipt:
    return wire.Receipt(
        session_id=b"\x01" * 32,
        step=9,
        kind=1,
        model_id=wire.model_id_hash("tiny"),
        block_start=2,
        block_end=6,
        node=node,
        client=client,
        tokens=12,
        price=7 * 10**9,
        amount=84 * 10**9,
        input_commitment=b"\x02" * 32,
        output_commitment=b"\x03" * 32,
        fingerprint=b"\x04" * 32,
        timestamp=1_700_000_123,
    )


def test_domain_separator_matches(chain, domain):
    assert bytes(chain.settlement.functions.domainSeparator().call()) == eip712.domain_separator(domain)


def test_receipt_digest_and_leaf_match(chain, roles, domain):
    r = _receipt(roles["node"][0]["address"], roles["client"][0]["address"])
    assert chain.receipt_digest(r) == eip712.receipt_digest(r, domain)
    assert chain.receipt_leaf(r.to_json()) == eip712.receipt_leaf(r)  # JSON form (hex strings) is accepted too


def test_voucher_signed_by_wire_settles(chain, roles, domain):
    client, node = roles["client"][2], roles["node"][2]
    chain.deposit(client["privateKey"], 5 * ETHER)
    v = wire.Voucher(client["address"], node["address"], 4, 2 * ETHER)
    assert chain.voucher_digest(v) == eip712.voucher_digest(v, domain)
    signed = eip712.sign_voucher(v, client["privateKey"], domain)
    chain.settle(roles["ledger"][0]["privateKey"], [(v, signed.signature)])
    assert chain.paid(client["address"], node["address"], 4) == 2 * ETHER
