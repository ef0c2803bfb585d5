"""The ledger bounds what a submitter can make it hold or do (issue 22), against a real ``nectar ledger`` process on
SQLite and a real Anvil: a chunked body over the limit is refused by the bytes read, oversized fingerprint bytes are
refused at intake, and a voucher whose client has no escrow is retired after one refusal on chain instead of closing
an epoch and failing a settlement at every close (until the client funds its escrow: then it is paid)."""

from __future__ import annotations

import json

import httpx
import pytest

from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.models import Epoch, EpochStatus, Settlement, SettlementStatus
from nectar.ledger.settlement import EpochSettler
from nectar.service.db import get_engine, session_scope
from nectar.wire.ledger_api import MAX_FINGERPRINT_BYTES
from tests.ledger.harness import LedgerDeployment
from tests.ledger.utils import Party, make_receipt, make_voucher, receipt_item

pytestmark = pytest.mark.slow
ETHER = 10**18
MAX_BODY = 32 * 1024 * 1024  # the ledger's default max_body_bytes


@pytest.fixture(scope="module")
def ledger(tmp_path_factory, contracts_snapshot):
    home = tmp_path_factory.mktemp("bounds")
    deployment = LedgerDeployment(
        home, database_url=f"sqlite:///{home / 'ledger.db'}", broker_url=f"sqla+sqlite:///{home / 'broker.db'}"
    )
    try:
        deployment.start_ledger()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def settler(ledger):
    settings = Settings(database_url=ledger.database_url, deployment_path=ledger.deployment_path)
    return EpochSettler(settings, get_engine(settings.database_url), ledger.chain)


def _receipt(ledger, **kwargs) -> dict:
    signed, fp = make_receipt(ledger.nodes[0], Party(), domain=ledger.domain, **kwargs)
    return receipt_item(signed, fp)


def _chunked(*parts: bytes):
    """A body sent with Transfer-Encoding: chunked (no Content-Length), 1 MiB a chunk."""
    for part in parts:
        for start in range(0, len(part), 1 << 20):
            yield part[start : start + (1 << 20)]


def test_a_chunked_body_over_the_limit_is_refused_by_the_bytes_read(ledger):
    item = json.dumps(_receipt(ledger)).encode()
    padding = b" " * (40 * 1024 * 1024)  # valid JSON whitespace: on main the whole 40 MiB was parsed and stored
    body = _chunked(b'{"receipts": [', item, padding, b"]}")
    response = httpx.post(
        f"{ledger.url}/v1/receipts", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 413, response.text[:300]
    assert str(MAX_BODY) in response.json()["detail"]
    # a chunked body under the limit is still taken
    small = _chunked(json.dumps({"receipts": [_receipt(ledger)]}).encode())
    response = httpx.post(
        f"{ledger.url}/v1/receipts", content=small, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 200 and response.json()["accepted"] == 1, response.text


def test_oversized_fingerprint_bytes_are_refused_and_not_stored(ledger):
    # a backward receipt's fingerprint is not checked as a compute descriptor: only its hash binds it, so on main
    # any size was accepted and stored
    item = _receipt(ledger, kind=2, descriptor=b"\x01" * (1 << 20))
    fine = _receipt(ledger, kind=2, descriptor=b"\x01" * MAX_FINGERPRINT_BYTES)
    with ledger.http() as h:
        response = h.post("/v1/receipts", json={"receipts": [item, fine]})
        assert response.status_code == 200, response.text[:300]
        oversized, stored = response.json()["results"]
        assert (oversized["status"], oversized["reason"]) == ("rejected", "bad_fingerprint")
        assert f"at most {MAX_FINGERPRINT_BYTES}" in oversized["message"]
        assert stored["status"] == "accepted"  # the rest of the batch is stored
        long_address = {**item, "receipt": {**item["receipt"], "client": "0x" + "ab" * 100_000}}
        response = h.post("/v1/receipts", json={"receipts": [long_address]})
        assert response.status_code == 422 and "receipt.client" in response.text


def _epochs_and_settlements(ledger) -> tuple[int, list]:
    with session_scope(get_engine(ledger.database_url)) as session:
        closed = len([e for e in crud.list_epochs(session, limit=500) if e.status != EpochStatus.COLLECTING])
        settlements = [(s.status, s.last_error) for s in session.query(Settlement).order_by(Settlement.id)]
        return closed, settlements


def test_an_unfunded_voucher_does_not_keep_epochs_open(ledger, settler):
    client, node = Party(), ledger.nodes[0]
    assert ledger.chain.escrow_balance(client.address) == 0
    with ledger.http() as h:
        signed = make_voucher(client, node, 5 * 10**15, domain=ledger.domain)
        response = h.post("/v1/vouchers", json={"vouchers": [signed.to_json()]})
        assert response.json()["accepted"] == 1, response.text
    settler.run(close=True)  # the voucher is sent once; the chain skips it (no escrow)
    closed, settlements = _epochs_and_settlements(ledger)
    assert settlements[-1][0] == SettlementStatus.FAILED and "InsufficientEscrow" in settlements[-1][1]
    for _ in range(5):  # on main: each close made a new epoch of this voucher and another failed settlement
        assert settler.run(close=True) == []
    assert _epochs_and_settlements(ledger) == (closed, settlements)
    with session_scope(get_engine(ledger.database_url)) as session:
        assert not crud.has_unsettled_vouchers(session)
        assert [v.client for v in crud.retired_vouchers(session)] == [client.address]


def test_a_retired_voucher_is_paid_once_its_client_has_escrow(ledger, settler):
    """Retiring never costs the node its pay: when the client deposits, the voucher goes back in the queue."""
    chain, deployer = ledger.chain, ledger.chain.deployment.accounts[0]["privateKey"]
    with session_scope(get_engine(ledger.database_url)) as session:
        unfunded = [v.client for v in crud.retired_vouchers(session)]
    closed, _ = _epochs_and_settlements(ledger)
    client, node = Party(), ledger.nodes[1]
    chain.send_eth(deployer, client.address, ETHER)  # gas for its deposit, later
    chain.faucet(client.address, 10 * ETHER)
    with ledger.http() as h:
        signed = make_voucher(client, node, 3 * 10**15, domain=ledger.domain)
        assert h.post("/v1/vouchers", json={"vouchers": [signed.to_json()]}).json()["accepted"] == 1
    settler.run(close=True)  # no escrow yet: skipped on chain, retired
    assert settler.run(close=True) == []
    assert chain.paid(client.address, node.address, 1) == 0
    key = "0x" + bytes(client.key).hex()
    chain.deposit(key, 1)  # a token balance below what it owes: the chain would skip it again, so it stays retired
    assert settler.run(close=True) == []
    chain.deposit(key, ETHER)
    settler.run(close=True)  # funded: back in the queue, settled in a new epoch
    assert chain.paid(client.address, node.address, 1) == 3 * 10**15
    assert _epochs_and_settlements(ledger)[0] == closed + 2
    with session_scope(get_engine(ledger.database_url)) as session:
        assert [v.client for v in crud.retired_vouchers(session)] == unfunded  # the one without escrow stays retired
        assert session.get(Epoch, closed + 2).status == EpochStatus.SETTLED
