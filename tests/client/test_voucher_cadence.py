"""Vouchers cost a signature at the client and a signer recovery at the node, per step and hop. A wallet reuses its
last voucher to a node for a while where the node announces a credit limit that the unpaid rest stays well under;
the closing payment always covers everything, and a node that announces no limit gets a fresh voucher every step."""

from __future__ import annotations

import pytest
from eth_account import Account

from nectar.client.payments import Wallet
from nectar.wire import eip712
from nectar.wire import receipts as schema
from nectar.wire.announce import MAX_ANNOUNCED_CREDIT, ServerInfo
from nectar.wire.protocol import pack_metadata, unpack_metadata

DOMAIN = eip712.make_domain(31337, "0x" + "11" * 20)
NODE = Account.create().address


def _owe(wallet: Wallet, amount: int) -> None:
    wallet._owed[schema.checksum_address(NODE, "node")] = amount  # what checked receipts add up to


def _amount(voucher: dict) -> int:
    return schema.SignedVoucher.from_json(voucher).voucher.cumulative_amount


def test_a_voucher_is_reused_while_the_rest_stays_under_a_quarter_of_the_nodes_limit():
    wallet = Wallet(domain=DOMAIN, voucher_interval=60.0)
    _owe(wallet, 10)
    first = wallet.voucher_for(NODE, credit_limit=400)
    _owe(wallet, 109)  # 99 unpaid beyond it: under 100
    assert wallet.voucher_for(NODE, credit_limit=400) is first
    _owe(wallet, 110)  # 100: a quarter of the limit
    assert _amount(wallet.voucher_for(NODE, credit_limit=400)) == 110
    _owe(wallet, 120)
    assert _amount(wallet.voucher_for(NODE, credit_limit=400)) == 110
    assert _amount(wallet.voucher_for(NODE, credit_limit=400, fresh=True)) == 120  # a session's closing payment
    assert eip712.recover_voucher_signer(schema.SignedVoucher.from_json(first), DOMAIN) == wallet.address


def test_a_node_that_announces_no_limit_gets_a_fresh_voucher_whenever_more_is_owed():
    wallet = Wallet(domain=DOMAIN, voucher_interval=60.0)
    for amount in (5, 6, 7):
        _owe(wallet, amount)
        assert _amount(wallet.voucher_for(NODE)) == amount
    assert wallet.voucher_for(NODE) == wallet.voucher_for(NODE)  # nothing more owed: the same voucher


def test_a_reused_voucher_expires_after_the_interval():
    wallet = Wallet(domain=DOMAIN, voucher_interval=0.0)
    _owe(wallet, 10)
    wallet.voucher_for(NODE, credit_limit=10**6)
    _owe(wallet, 11)
    assert _amount(wallet.voucher_for(NODE, credit_limit=10**6)) == 11


def _info(**fields) -> dict:
    base = dict(state=2, start=0, end=4, throughput=1.0, inference_rps=1.0, forward_rps=1.0, network_rps=1.0)
    base |= dict(dtype="float32", cache_tokens_left=1, price_per_token=1, eth_address="")
    return base | fields


def test_announced_credit_limits_are_checked_integers():
    assert ServerInfo.from_dict(_info()).credit_limit == 0  # a node from before the field: a voucher every step
    info = ServerInfo.from_dict(_info(credit_limit=MAX_ANNOUNCED_CREDIT))
    assert ServerInfo.from_dict(unpack_metadata(pack_metadata(info.to_dict()))).credit_limit == MAX_ANNOUNCED_CREDIT
    for bad in (-1, MAX_ANNOUNCED_CREDIT + 1, 1.5, "100", None):
        with pytest.raises(ValueError):
            ServerInfo.from_dict(_info(credit_limit=bad))
