"""Epochs settle on a real Anvil through a real Celery worker on the default SQLite database and SQLite broker;
killing the worker with SIGKILL mid-settlement and restarting it pays every voucher exactly once."""

from __future__ import annotations

import os
import sqlite3

import pytest

from nectar.wire.eip712 import receipt_leaf, receipt_struct_hash
from nectar.wire.merkle import merkle_proof, merkle_root
from nectar.wire.receipts import SignedReceipt
from tests.ledger.harness import LedgerDeployment
from tests.ledger.utils import make_receipt, make_voucher, receipt_item, wait_for

pytestmark = pytest.mark.slow
DEPOSIT = 10**21


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    home = tmp_path_factory.mktemp("ledger-sqlite")
    deployment = LedgerDeployment(
        home, database_url=f"sqlite:///{home / 'ledger.db'}", broker_url=f"sqla+sqlite:///{home / 'broker.db'}"
    )
    try:
        for client in deployment.clients[:2]:
            deployment.chain.deposit(client.key, DEPOSIT)
        deployment.start_ledger()
        yield deployment
    finally:
        deployment.stop()


def submit_work(market, *, steps: int, price: int, session_id: bytes | None = None):
    """Every (client, node) pair does ``steps`` steps; returns {(client, node): amount charged} and the receipts."""
    charged, items = {}, []
    for client in market.clients[:2]:
        for node in market.nodes[:3]:
            sid = session_id or os.urandom(32)
            for step in range(steps):
                signed, fp = make_receipt(node, client, session_id=sid, step=step, price=price, domain=market.domain)
                items.append(receipt_item(signed, fp))
                charged[(client.address, node.address)] = (
                    charged.get((client.address, node.address), 0) + signed.receipt.amount
                )
    with market.http() as h:
        result = h.post("/v1/receipts", json={"receipts": items}).json()
    assert result["accepted"] == len(items), result
    return charged, items


def pay(market, cumulative: dict):
    vouchers = []
    for client in market.clients[:2]:
        for node in market.nodes[:3]:
            vouchers.append(
                make_voucher(client, node, cumulative[(client.address, node.address)], domain=market.domain).to_json()
            )
    with market.http() as h:
        assert h.post("/v1/vouchers", json={"vouchers": vouchers}).json()["accepted"] == len(vouchers)


def balances(market):
    chain = market.chain
    return (
        {n.address: chain.node_balance(n.address) for n in market.nodes[:3]},
        {c.address: chain.escrow_balance(c.address) for c in market.clients[:2]},
    )


def expected_net(gross_by_node: dict, fee_bps: int) -> dict:
    return {node: gross - gross * fee_bps // 10_000 for node, gross in gross_by_node.items()}


def test_epoch_commits_root_and_settles_exact_amounts(market):
    market.start_worker()
    nodes_before, escrow_before = balances(market)
    charged, items = submit_work(market, steps=5, price=10**13)
    pay(market, charged)
    closed = market.close_epoch()["closed"]
    epoch = market.wait_settled(closed["number"])
    leaves = [receipt_leaf(SignedReceipt.from_json(i).receipt) for i in items]
    assert bytes.fromhex(epoch["root"][2:]) == merkle_root(leaves) == market.chain.epoch_root(closed["number"])
    first = SignedReceipt.from_json(items[0]).receipt
    assert market.chain.verify_inclusion(closed["number"], receipt_struct_hash(first), merkle_proof(leaves, 0))
    nodes_after, escrow_after = balances(market)
    fee_bps = market.chain.deployment.params["fee_bps"]
    gross_by_node = {n.address: sum(a for (c, nn), a in charged.items() if nn == n.address) for n in market.nodes[:3]}
    for node, net in expected_net(gross_by_node, fee_bps).items():
        assert nodes_after[node] - nodes_before[node] == net
    for client in market.clients[:2]:
        spent = sum(a for (c, _), a in charged.items() if c == client.address)
        assert escrow_before[client.address] - escrow_after[client.address] == spent
    market.cumulative = charged


def test_sigkill_mid_settlement_pays_exactly_once(market):
    # one voucher per transaction, and the worker stalls right after the first settle() is mined
    market.kill9(market.worker)
    market.start_worker(crash_point="after_settle", settle_batch_size=1)
    nodes_before, escrow_before = balances(market)
    charged, _ = submit_work(market, steps=3, price=10**13)
    cumulative = {k: market.cumulative[k] + v for k, v in charged.items()}
    pay(market, cumulative)
    closed = market.close_epoch()["closed"]
    wait_for(lambda: market.marker("after_settle").exists(), 120, "the worker to reach the crash point")
    market.kill9(market.worker)  # after the first batch was paid on chain, before the ledger recorded it
    paid_now = {k: market.chain.paid(k[0], k[1], 1) for k in cumulative}
    assert sum(paid_now[k] == cumulative[k] for k in cumulative) == 1  # exactly one batch went through
    assert market.epoch(closed["number"])["status"] == "root_committed"

    market.marker("after_settle").unlink()
    market.start_worker(settle_batch_size=1)
    market.close_epoch()  # enqueue the advance (nothing new to close)
    market.wait_settled(closed["number"])
    nodes_after, escrow_after = balances(market)
    fee_bps = market.chain.deployment.params["fee_bps"]
    for (client, node), total in cumulative.items():
        assert market.chain.paid(client, node, 1) == total
    # one voucher per batch: each node's fee is computed per (client, node) gross
    for node in nodes_after:
        expected = sum(g - g * fee_bps // 10_000 for (c, n), g in charged.items() if n == node)
        assert nodes_after[node] - nodes_before[node] == expected
    for client in escrow_after:
        assert escrow_before[client] - escrow_after[client] == sum(g for (c, _), g in charged.items() if c == client)


def test_drained_escrow_skips_its_voucher_and_the_batch_settles(market):
    """Issue 20: a client that withdraws its escrow before its voucher settles used to revert the whole batch
    (InsufficientEscrow). Now the contract skips that voucher (VoucherSkipped), the other clients' vouchers of the
    batch settle, and the ledger marks the item skipped, not paid."""
    market.kill9(market.worker)
    market.start_worker()  # default batch size: the drained client's voucher shares a batch with another client's
    chain, node = market.chain, market.nodes[0]
    drainer, honest = market.clients[2], market.clients[0]
    chain.deposit(drainer.key, 10**16)
    items, cumulative = [], {}
    for client in (drainer, honest):
        signed, fp = make_receipt(node, client, session_id=os.urandom(32), step=0, price=10**12, domain=market.domain)
        items.append(receipt_item(signed, fp))
        cumulative[client.address] = chain.paid(client.address, node.address, 1) + signed.receipt.amount
    with market.http() as h:
        assert h.post("/v1/receipts", json={"receipts": items}).json()["accepted"] == 2
        vouchers = [
            make_voucher(c, node, cumulative[c.address], domain=market.domain).to_json() for c in (drainer, honest)
        ]
        assert h.post("/v1/vouchers", json={"vouchers": vouchers}).json()["accepted"] == 2
    chain.request_withdrawal(drainer.key, 10**16)  # the client drains its escrow before the epoch settles
    chain.advance_time(chain.deployment.params["unlock_delay"])
    chain.withdraw(drainer.key)

    start = chain.block_number() + 1
    closed = market.close_epoch()["closed"]
    market.wait_settled(closed["number"])

    def settled_items():
        # these vouchers' items, whichever epoch prepared them: vouchers are not tied to epochs, and an epoch still
        # settling when they arrived (its task redelivered to the restarted worker) takes the latest voucher too
        with sqlite3.connect(market.home / "ledger.db") as db:
            rows = db.execute(
                "SELECT i.client, i.status, s.status, s.last_error, s.tx_hash, i.cumulative_amount "
                "FROM settlement_items i JOIN settlements s ON s.id = i.settlement_id "
                "WHERE i.node = ? AND i.client IN (?, ?) AND i.status != 'pending' ORDER BY i.id",
                (node.address, drainer.address, honest.address),
            ).fetchall()
        rows = [r[:5] for r in rows if int(r[5]) == cumulative[r[0]]]
        return rows if {r[0] for r in rows} == {honest.address, drainer.address} else None

    rows = wait_for(settled_items, 60, "both vouchers' settlement items")
    assert chain.paid(drainer.address, node.address, 1) == 0
    assert chain.paid(honest.address, node.address, 1) == cumulative[honest.address]
    (honest_row,) = [r for r in rows if r[0] == honest.address]
    assert honest_row[1] == "paid"
    # the drained voucher was skipped (not reverted) in the very transaction that paid the honest one
    (drained_row,) = [r for r in rows if r[0] == drainer.address and r[4] == honest_row[4]]
    _, item, batch, error, tx_hash = drained_row
    assert (item, batch) == ("skipped", "failed") and "InsufficientEscrow" in error
    (settled,) = [b for b in chain.settlements_since(start) if b["txHash"] == tx_hash]
    assert [v["client"] for v in settled["vouchers"]] == [honest.address]
    assert [(s["voucher"]["client"], s["reason"]) for s in settled["skipped"]] == [
        (drainer.address, "InsufficientEscrow")
    ]
