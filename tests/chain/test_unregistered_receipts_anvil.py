"""Receipts signed by keys the registry does not know (issue 21): the ledger keeps them as evidence only, and keys
cost nothing to mint, so their rows are bounded per key and in all; registered nodes' receipts are not affected.
Real Anvil, the ledger's real HTTP service and SQLite."""

from __future__ import annotations

import httpx
from sqlalchemy import func, select

from nectar.ledger.core.config import Settings
from nectar.ledger.models import Receipt
from nectar.service.db import session_scope
from tests.chain.test_backed_vouchers_anvil import _serve_ledger
from tests.ledger.utils import Party, make_receipt, receipt_item

PER_KEY, TOTAL = 50, 120


def _post(base_url: str, items: list[dict]) -> dict:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        response = http.post("/v1/receipts", json={"receipts": items})
    assert response.status_code == 200, response.text
    return response.json()


def test_receipts_of_unregistered_keys_are_bounded(devnet, chain, roles, tmp_path):
    """A flood of self-signed receipts from fresh keys used to be stored row for row without end; now each such key
    keeps at most ``unregistered_receipts_per_key`` rows and all of them ``unregistered_receipts_total``, the rest
    refused with ``unregistered_full`` (saying how to register); a registered node's receipts still go in."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}",
        deployment_path=devnet.deployment_path,
        unregistered_receipts_per_key=PER_KEY,
        unregistered_receipts_total=TOTAL,
    )
    app, ledger, stop = _serve_ledger(settings)
    domain, client = chain.eip712_domain(), Party()
    registered = roles["node"][0]
    if not chain.node_info(registered["address"])["registered"]:
        chain.register_node(registered["privateKey"], "devnet-node-0", chain.deployment.params["min_stake"])
    try:
        # one key: its first PER_KEY receipts are kept, the next refused, a resubmission is still a duplicate
        flooder = Party()
        receipts = [make_receipt(flooder, client, step=i, domain=domain) for i in range(PER_KEY + 30)]
        result = _post(ledger.base_url, [receipt_item(s, fp) for s, fp in receipts])
        assert result["accepted"] == PER_KEY and result["rejected"] == 30
        refused = [r for r in result["results"] if r["status"] == "rejected"]
        assert {r["reason"] for r in refused} == {"unregistered_full"}
        assert "nectar operator register" in refused[0]["message"]
        again = _post(ledger.base_url, [receipt_item(*receipts[0])])
        assert again["duplicates"] == 1

        # many keys: rows of all unregistered keys stop at TOTAL
        for _ in range(6):
            sybil = Party()
            _post(
                ledger.base_url, [receipt_item(*make_receipt(sybil, client, step=i, domain=domain)) for i in range(40)]
            )
        with session_scope(app.state.ledger.engine) as session:
            rows = session.scalar(select(func.count(Receipt.id)))
        assert rows == TOTAL, f"{rows} rows of unregistered keys stored (bound {TOTAL})"

        # a registered node is not held to it
        node = Party(registered["privateKey"])
        result = _post(
            ledger.base_url, [receipt_item(*make_receipt(node, client, step=i, domain=domain)) for i in range(60)]
        )
        assert result["accepted"] == 60, result["results"][:2]
    finally:
        stop()
