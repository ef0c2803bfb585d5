"""Reputation only from what cannot be forged (issue 21, items 3 and 5), on a real Anvil, ledger, worker and node.

Work counts only when the receipt's client countersigned it and paid the node on chain or holds a reserve for it (up
to that amount); reports come only from such clients, once per nonce, at a bounded rate; a node that withholds its
receipts still has its steps on record, because the client submits them. Each test here failed before that.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import torch
from eth_account import Account
from eth_account.messages import encode_defunct

from nectar.ledger.models import Node, Receipt
from nectar.operator import ensure_registered
from nectar.service.db import session_scope
from nectar.wire import eip712
from nectar.wire.eip712 import receipt_leaf
from nectar.wire.ledger_api import report_message
from nectar.wire.receipts import keccak256
from tests.ledger.market import NUM_BLOCKS, SwarmMarket
from tests.ledger.utils import Party, make_receipt, make_voucher, wait_for

pytestmark = pytest.mark.slow
PRICE = 10**12  # credit wei per token per block
MIN_BACKING = 10**15  # the ledger's report_min_backing (default)


@pytest.fixture(scope="module")
def market(tmp_path_factory, contracts_snapshot, monkeypatch_module):
    home = tmp_path_factory.mktemp("unforgeable")
    market = SwarmMarket(home, price=PRICE, model_name="tiny-unforgeable-llama")
    try:
        monkeypatch_module.setenv("NECTAR_DEPLOYMENT", str(market.deployment.deployment_path))
        market.deployment.start_ledger()
        market.deployment.start_worker()
        market.domain = market.deployment.domain
        yield market
    finally:
        market.stop()


def _funded(market) -> Party:
    """A fresh key with ETH for gas, 1 credit and the minimum stake."""
    party = Party()
    market.chain.send_eth(market.chain.default_key(), party.address, 10**18)
    market.chain.faucet(party.address, 10**18 + market.chain.deployment.params["min_stake"])
    return party


def _staked(market) -> Party:
    """A fresh node key registered with the minimum stake (under a placeholder peer id: no process behind it)."""
    node = _funded(market)
    market.chain.register_node(node.key, f"placeholder-{node.address}", market.chain.deployment.params["min_stake"])
    return node


def _post_voucher(market, voucher) -> None:
    """Posts a voucher to a node staked a moment ago: the ledger re-reads stakes at most once a second."""

    def accepted():
        with _http(market) as h:
            result = h.post("/v1/vouchers", json={"vouchers": [voucher.to_json()]}).json()
        assert result["rejected"] == 0 or result["results"][0]["reason"] == "node_not_staked", result
        return result["accepted"] + result["duplicates"] == 1

    wait_for(accepted, 10, "the ledger to accept the voucher")


def _http(market) -> httpx.Client:
    return httpx.Client(base_url=market.url, timeout=30)


def _countersign(signed, client: Party, domain: dict) -> bytes:
    """The client's countersignature, computed from its documented type (docs/protocol.md), not the library's."""
    type_hash = keccak256(b"Acceptance(bytes32 receipt)")
    struct = keccak256(type_hash + eip712.receipt_struct_hash(signed.receipt))
    return eip712.sign_digest(eip712.typed_digest(domain, struct), client.key)


def _item(signed, fp: bytes, countersignature: bytes | None = None) -> dict:
    item = {**signed.to_json(), "fingerprintBytes": "0x" + fp.hex()}
    if countersignature is not None:
        item["clientSignature"] = "0x" + countersignature.hex()
    return item


def _post_receipts(market, items: list[dict]) -> dict:
    with _http(market) as h:
        response = h.post("/v1/receipts", json={"receipts": items})
    assert response.status_code == 200, response.text
    return response.json()


def _view(market, address: str) -> dict:
    with _http(market) as h:
        response = h.get(f"/v1/nodes/{address}")
    assert response.status_code == 200, response.text
    return response.json()


def _score(market, address: str) -> dict | None:
    with _http(market) as h:
        nodes = h.get("/v1/reputation").json()["nodes"]
    return next((n for n in nodes if n["address"] == address), None)


def _report(market, client: Party, node: str, *, nonce: int, **measurement) -> dict:
    """A signed report body as ``LedgerClient.report`` builds it."""
    body = {
        "node": node,
        "reporter": client.address,
        "nonce": nonce,
        "online": measurement.get("online"),
        "success": measurement.get("success"),
        "latency_ms": measurement.get("latency_ms"),
        "throughput": measurement.get("throughput"),
        "timestamp": int(time.time()),
    }
    signature = Account.sign_message(encode_defunct(text=report_message(body)), client.key).signature
    return {**body, "signature": "0x" + bytes(signature).hex()}


def _counters(market, address: str) -> tuple[int, int, int]:
    with session_scope(market.engine) as session:
        node = session.get(Node, address)
        return (node.uptime_checks or 0, node.successes or 0, node.failures or 0) if node else (0, 0, 0)


def test_self_signed_receipts_for_sessions_that_never_happened_do_not_count(market):
    """A node's own receipts for a client it invented (also countersigned by that invented client) and an unregistered
    key's receipts are stored as claims, never as work: earned, `new` and the score stay where they were."""
    staked = market.deployment.nodes[1]  # registered with the minimum stake
    stranger = Party()  # registered nowhere
    before = _score(market, staked.address)
    for node in (staked, stranger):
        sybil = Party()  # a client key that never paid anyone
        receipts = [make_receipt(node, sybil, step=i, price=10**30, domain=market.domain) for i in range(120)]
        items = [_item(s, fp) for s, fp in receipts[:60]]
        items += [_item(s, fp, _countersign(s, sybil, market.domain)) for s, fp in receipts[60:]]
        result = _post_receipts(market, items)
        assert result["accepted"] == 120  # kept: they are the node's own claims (and evidence against it)
        view = _view(market, node.address)
        assert view["earned"] == "0", view
        assert view["reputation"]["new"] is True and view["reputation"]["receipts"] == 0
    after = _score(market, staked.address)
    if before is not None:
        assert after["score"] == before["score"] and after["new"] == before["new"]


def test_an_unfunded_one_wei_voucher_does_not_make_a_reporter(market):
    node = market.deployment.nodes[2]
    sybil = Party()
    with _http(market) as h:
        voucher = make_voucher(sybil, node, 1, domain=market.domain)
        result = h.post("/v1/vouchers", json={"vouchers": [voucher.to_json()]}).json()
        assert result["accepted"] == 1  # the ledger keeps it (it may settle one day); it vouches for nothing
        before = _counters(market, node.address)
        response = h.post("/v1/reports", json=_report(market, sybil, node.address, nonce=1, success=False))
    assert response.status_code == 403, response.text
    assert "nectar escrow reserve" in response.json()["detail"]
    assert _counters(market, node.address) == before


def test_a_replayed_report_counts_once_and_one_client_cannot_flood_a_node(market):
    node, client = _staked(market), market.clients[2]
    market.chain.deposit(client.key, 10 * MIN_BACKING)
    market.chain.reserve(client.key, node.address, MIN_BACKING)  # backs its reports about this node
    before = _counters(market, node.address)
    body = _report(market, client, node.address, nonce=time.time_ns(), online=False, success=False)
    _post_voucher(market, make_voucher(client, node, MIN_BACKING, domain=market.domain))  # and it pays the node
    with _http(market) as h:
        statuses = [h.post("/v1/reports", json=body).status_code for _ in range(200)]
        assert statuses[0] == 200 and set(statuses[1:]) == {409}, statuses[:5]
        after = _counters(market, node.address)
        assert [a - b for a, b in zip(after, before)] == [1, 0, 1]  # one uptime check, one failure
        # fresh nonces: a burst, then the rate bound (per client and node)
        fresh = [
            h.post("/v1/reports", json=_report(market, client, node.address, nonce=time.time_ns(), success=False))
            for _ in range(10)
        ]
    codes = [r.status_code for r in fresh]
    assert codes.count(200) == 2 and codes[2:] == [429] * 8, codes  # a burst of 3 (one spent above)
    assert "reports an hour" in fresh[-1].json()["detail"]
    assert _counters(market, node.address)[2] - before[2] == 3


def test_work_counts_once_and_only_as_far_as_the_clients_payment_covers_it(market):
    """A node's receipts count once the client countersigned them (in either order of submission, once), up to what
    the client reserved for the node; the rest waits until the chain pays for it (a settled voucher)."""
    node, client = _staked(market), market.clients[1]
    step_amount = 4 * PRICE * NUM_BLOCKS  # make_receipt: 4 tokens
    market.chain.deposit(client.key, 10**18)
    market.chain.reserve(client.key, node.address, 10 * step_amount)
    receipts = [
        make_receipt(node, client, step=i, price=PRICE * NUM_BLOCKS, block_end=NUM_BLOCKS, domain=market.domain)
        for i in range(15)
    ]
    assert _post_receipts(market, [_item(s, fp) for s, fp in receipts])["accepted"] == 15  # the node's own
    assert _view(market, node.address)["earned"] == "0"  # claims, until the client vouches for them
    assert _view(market, node.address)["work_steps"] == 0
    countersigned = [_item(s, fp, _countersign(s, client, market.domain)) for s, fp in receipts]
    result = _post_receipts(market, countersigned)
    assert result["duplicates"] == 15 and result["accepted"] == 0
    _post_receipts(market, countersigned)  # a client's retry counts nothing twice
    view = _view(market, node.address)
    assert view["work_steps"] == 10 and int(view["earned"]) == 10 * step_amount  # the reserve covers 10 of 15
    # the client pays for all 15: once the voucher settles on chain, the other 5 count
    _post_voucher(market, make_voucher(client, node, 15 * step_amount, channel=77, domain=market.domain))
    market.close_and_settle()
    view = _view(market, node.address)
    assert view["work_steps"] == 15 and int(view["earned"]) == 15 * step_amount


def _add_withholding_node(market, name: str):
    """A staked node that sends nothing to the ledger: no --ledger-url, so its receipts never leave it."""
    key_dir = market.swarm.workdir / "keys" / name
    key_dir.mkdir(parents=True, exist_ok=True)
    key = market.node_keys[0]
    (key_dir / "eth.json").write_text(json.dumps({"address": Party(key).address, "private_key": key}))
    keys = ensure_registered(market.chain, key_dir, funder_key=market.chain.default_key())
    market.registered[keys.address.lower()] = keys.peer_id  # wait_for_swarm waits for the ledger to see it
    args = [
        "--price",
        str(PRICE),
        "--trusted-clients",  # no ledger to check escrow: it serves the one client of the test on its vouchers
        market.clients[0].address,
        "--throughput",
        "100",
        "--num-threads",
        "1",
        "--announce-period",
        "3",
    ]
    args += ["--dtype", "float32"]
    return market.swarm.add_node(str(market.model_path), blocks=(0, NUM_BLOCKS), name=name, extra_args=args)


def test_a_node_withholding_its_receipts_still_has_its_steps_on_record(market):
    """The client countersigns each receipt it accepts and posts it (with the fingerprint, so the step can be
    audited): the ledger holds every step of a node that posts none, and counts it as work the client backed."""
    from nectar.client import ClientConfig

    node = _add_withholding_node(market, "withholder")
    market.wait_for_swarm()
    client = market.clients[0]
    market.chain.deposit(client.key, 10**18)
    market.chain.reserve(client.key, node.eth_address, 10**17)
    model = market.client_model(client, config=ClientConfig(ledger_url=market.url))
    try:
        out = model.generate(torch.arange(3, 9).unsqueeze(0), max_new_tokens=8, do_sample=False)
        assert out.shape == (1, 14)
        wallet = model.wallet
    finally:
        model.shutdown()  # flushes the countersigned receipts still queued
    mine = [r for r in wallet.receipts if r.receipt.node == node.eth_address]
    assert len(mine) >= 8  # the prompt, then each new token but the last
    leaves = {receipt_leaf(r.receipt) for r in mine}
    wait_for(lambda: leaves <= market.stored_leaves(client.address), 30, "the client's receipts to reach the ledger")
    from nectar.ledger.models import ClientNode

    with session_scope(market.engine) as session:
        rows = [r for r in session.query(Receipt).filter(Receipt.node == node.eth_address) if r.leaf in leaves]
        assert all(r.client_signature is not None and r.fingerprint for r in rows)  # auditable: fingerprint bytes
        pair = session.query(ClientNode).filter_by(client=client.address, node=node.eth_address).one()
        assert pair.counted_steps == len(mine)
    assert _view(market, node.eth_address)["work_steps"] == len(mine)


def test_a_countersignature_from_anyone_but_the_receipts_client_is_refused(market):
    node, client, impostor = market.deployment.nodes[1], Party(), Party()
    signed, fp = make_receipt(node, client, domain=market.domain, session_id=os.urandom(32))
    result = _post_receipts(market, [_item(signed, fp, _countersign(signed, impostor, market.domain))])
    assert result["results"][0]["reason"] == "bad_countersignature"
    assert "only the client countersigns" in result["results"][0]["message"]
