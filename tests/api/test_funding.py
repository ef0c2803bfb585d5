"""Funding accounts on a real devnet: the faucet, and escrow deposits to the gateway from a linked address, credited
once (whatever the rescans), including deposits made before the address was linked; bad links are refused."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from eth_account import Account

from nectar.api.launch import demo_account, example_request
from tests.api.conftest import new_customer
from tests.api.utils import deposit_for, funded_wallet, link_signature, wait_for

pytestmark = pytest.mark.slow
MICRO_PER_CREDIT = 10**6


def test_devnet_faucet_funds_the_account_and_the_gateway_escrow(api, market):
    customer = new_customer(api)
    escrow_before = market.chain.escrow_balance(market.gateway)
    with customer.http() as h:
        deposit = h.post("/v1/account/faucet", json={"credits": "2"})
        assert deposit.status_code == 200, deposit.text
        too_much = h.post("/v1/account/faucet", json={"credits": "-1"})
        assert too_much.status_code == 400 and too_much.json()["error"]["param"] == "credits"
        assert h.post("/v1/account/deposits/scan").status_code == 200  # the faucet's own event is not credited twice
    body = deposit.json()
    assert (body["source"], body["amount_micro"]) == ("faucet", 2 * MICRO_PER_CREDIT)
    assert market.chain.escrow_balance(market.gateway) - escrow_before == 2 * 10**18
    assert market.chain.w3.eth.get_transaction_receipt(body["tx_hash"])["status"] == 1
    assert customer.account()["balance_micro"] == 2 * MICRO_PER_CREDIT


def test_escrow_deposit_from_the_linked_address_is_credited_once(api, market):
    customer = new_customer(api)
    wallet = funded_wallet(market.chain)
    with customer.http() as h:
        funding = h.get("/v1/account/funding").json()
        assert funding["gateway_address"] == market.gateway
        assert funding["escrow"] == market.chain.address_of("Escrow") and funding["faucet_available"] is True
        linked = h.put(
            "/v1/account/address",
            json={"eth_address": wallet.address, "signature": link_signature(wallet, customer.account_id)},
        )
        assert linked.status_code == 200, linked.text
        escrow_before = market.chain.escrow_balance(market.gateway)
        tx = deposit_for(market.chain, wallet, market.gateway, 3 * 10**18)
        scan = h.post("/v1/account/deposits/scan")
        assert scan.status_code == 200, scan.text
        assert scan.json()["account"]["balance_micro"] == 3 * MICRO_PER_CREDIT
        for _ in range(3):  # rescans (and the background scan) never credit the same event twice
            h.post("/v1/account/deposits/scan")
        deposits = h.get("/v1/account/deposits").json()["data"]
    assert customer.account()["balance_micro"] == 3 * MICRO_PER_CREDIT
    assert [(d["source"], d["tx_hash"], d["depositor"]) for d in deposits] == [("chain", tx, wallet.address)]
    assert market.chain.escrow_balance(market.gateway) - escrow_before == 3 * 10**18


def test_deposit_before_linking_is_credited_when_the_address_is_linked(api, market):
    wallet = funded_wallet(market.chain)
    deposit_for(market.chain, wallet, market.gateway, 10**18)
    customer = new_customer(api)
    with customer.http() as h:
        h.post("/v1/account/deposits/scan")
        assert customer.account()["balance_micro"] == 0  # nobody had linked that address yet
        linked = h.put(
            "/v1/account/address",
            json={"eth_address": wallet.address, "signature": link_signature(wallet, customer.account_id)},
        )
    assert linked.status_code == 200 and linked.json()["balance_micro"] == MICRO_PER_CREDIT
    deposit_for(market.chain, wallet, market.gateway, 10**18)  # later deposits arrive through the background scan
    wait_for(lambda: customer.account()["balance_micro"] == 2 * MICRO_PER_CREDIT, 30, "the background deposit scan")


def test_links_need_the_address_owner_and_are_unique(api, market):
    owner, other = Account.create(), Account.create()
    first, second = new_customer(api), new_customer(api)
    with first.http() as h:
        forged = h.put(
            "/v1/account/address",
            json={"eth_address": owner.address, "signature": link_signature(other, first.account_id)},
        )
        assert forged.status_code == 403 and forged.json()["error"]["param"] == "signature"
        garbage = h.put("/v1/account/address", json={"eth_address": owner.address, "signature": "0x" + "00" * 65})
        assert garbage.status_code in (400, 403)
        malformed = h.put("/v1/account/address", json={"eth_address": "0x123", "signature": "0x00"})
        assert malformed.status_code == 400 and malformed.json()["error"]["param"] in ("eth_address", "signature")
        assert (
            h.put(
                "/v1/account/address",
                json={"eth_address": owner.address, "signature": link_signature(owner, first.account_id)},
            ).status_code
            == 200
        )
    with second.http() as h:
        taken = h.put(
            "/v1/account/address",
            json={"eth_address": owner.address, "signature": link_signature(owner, second.account_id)},
        )
    assert taken.status_code == 409
    # a signature made for another account does not transfer
    with second.http() as h:
        replayed = h.put(
            "/v1/account/address",
            json={"eth_address": other.address, "signature": link_signature(other, first.account_id)},
        )
    assert replayed.status_code == 403


def test_signup_and_admin_endpoints_need_the_right_token(api, market):
    customer = new_customer(api)
    response = httpx.post(
        f"{api.url}/v1/admin/accounts/{customer.account_id}/credit",
        json={"credits": "5"},
        headers={"Authorization": f"Bearer {customer.key}"},
    )
    assert response.status_code == 401
    assert customer.account()["balance_micro"] == 0


def test_demo_account_and_the_request_a_user_copies(api, market):
    """What `nectar demo` prints: a funded account and a request that works when pasted into a shell."""
    account = demo_account(api.url, credits="1")
    assert account["account"]["balance_micro"] == MICRO_PER_CREDIT
    curl, python = example_request(api.url, account["api_key"], market.model).split("\n\n")
    answered = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    body = json.loads(answered.stdout)
    assert body["object"] == "chat.completion" and body["usage"]["total_tokens"] > 0, answered
    ran = subprocess.run(["bash", "-c", python], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {account['api_key']}"}) as h:
        spent = h.get("/v1/account").json()["spent_micro"]
        usage = h.get("/v1/account/usage").json()["data"]
    assert len(usage) == 2 and spent == sum(u["cost_micro"] for u in usage) > 0
