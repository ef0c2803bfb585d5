"""Production shape: PostgreSQL database, Redis broker, real Anvil, real worker with beat. Killing the ledger service
or the worker (after the root is committed, before it is recorded) loses nothing and commits nothing twice; a
double-signing node is slashed on chain from the stored evidence."""

from __future__ import annotations

import os

import pytest
import redis

from tests.ledger.harness import LedgerDeployment
from tests.ledger.test_settlement_sqlite_broker import balances, pay, submit_work
from tests.ledger.utils import fresh_postgres_url, make_receipt, receipt_item, wait_for

pytestmark = pytest.mark.slow
REDIS_DB = 7


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    home = tmp_path_factory.mktemp("ledger-redis")
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    url, drop = fresh_postgres_url("ledger_settle")
    deployment = LedgerDeployment(home, database_url=url, broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}")
    try:
        for client in deployment.clients[:2]:
            deployment.chain.deposit(client.key, 10**21)
        deployment.start_ledger()
        yield deployment
    finally:
        deployment.stop()
        drop()


def test_ledger_killed_between_submissions_loses_nothing(market):
    market.start_worker(crash_point="after_commit_root")
    charged, items = submit_work(market, steps=4, price=10**13)
    market.kill9(market.ledger)  # SIGKILL right after answering: the receipts must already be durable
    market.start_ledger()
    with market.http() as h:
        again = h.post("/v1/receipts", json={"receipts": items}).json()
    assert again["duplicates"] == len(items) and again["accepted"] == 0  # a node's retry is not double counted
    pay(market, charged)
    market.charged = charged


def test_worker_killed_after_root_commit_does_not_commit_twice(market):
    nodes_before, escrow_before = balances(market)
    closed = market.close_epoch()["closed"]
    wait_for(lambda: market.marker("after_commit_root").exists(), 120, "the worker to reach the crash point")
    market.kill9(market.worker)  # the root is on chain, the ledger has not recorded it
    assert market.chain.epoch_root(closed["number"]) == bytes.fromhex(closed["root"][2:])
    assert market.epoch(closed["number"])["status"] == "closed"
    market.marker("after_commit_root").unlink()
    market.start_worker(epoch_seconds=1)  # beat alone picks the epoch up again
    epoch = market.wait_settled(closed["number"])
    assert epoch["root_tx_hash"] is None  # recognised on chain, not sent again (a resend would revert)
    nodes_after, escrow_after = balances(market)
    fee_bps = market.chain.deployment.params["fee_bps"]
    for node in nodes_after:
        gross = sum(g for (c, n), g in market.charged.items() if n == node)
        assert nodes_after[node] - nodes_before[node] == gross - gross * fee_bps // 10_000
    for client in escrow_after:
        assert escrow_before[client] - escrow_after[client] == sum(
            g for (c, _), g in market.charged.items() if c == client
        )


def test_double_sign_evidence_is_slashed_on_chain(market):
    node, client = market.nodes[2], market.clients[0]
    # registered by the harness (LedgerDeployment.register_nodes)
    stake_before = market.chain.stake_of(node.address)
    sid, same_input = os.urandom(32), os.urandom(32)  # a real equivocation: one input, two outputs (issue 20)
    # stamped with the chain's time: the contract refuses evidence older than maxEvidenceAge or from its future, and
    # this module's settlement tests move the devnet's clock ahead of the wall clock
    now = market.chain.w3.eth.get_block("latest")["timestamp"]
    same = dict(session_id=sid, step=7, domain=market.domain, input_commitment=same_input, timestamp=now)
    first, second = make_receipt(node, client, **same), make_receipt(node, client, **same)
    with market.http() as h:
        assert h.post("/v1/receipts", json={"receipts": [receipt_item(*first)]}).json()["accepted"] == 1
        verdict = h.post("/v1/receipts", json={"receipts": [receipt_item(*second)]}).json()["results"][0]
        assert verdict["reason"] == "conflict"
    # beat (every second) runs slash_conflicts
    wait_for(lambda: market.chain.stake_of(node.address) < stake_before, 60, "the slash to land on chain")
    with market.http() as h:
        view = h.get(f"/v1/nodes/{node.address}").json()
    wait_for(
        lambda: market.http().get(f"/v1/nodes/{node.address}").json()["conflicts"][0]["status"] == "slashed",
        30,
        "the ledger to record the slash",
    )
    assert view["reputation"]["slashes"] in (0, 1)
