"""The ledger's HTTP API on SQLite and PostgreSQL: accepted, duplicate, forged, replayed, conflicting, malformed."""

from __future__ import annotations

import os
import threading
import time

from nectar.deployment import domain_from_deployment
from nectar.ledger import crud
from nectar.service.db import get_engine, session_scope
from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as R
from nectar.wire.merkle import merkle_proof, merkle_root, verify_proof
from tests.ledger.utils import Party, make_receipt, make_voucher, receipt_item

NODE, CLIENT = Party(), Party()


def post(api, items):
    response = api.post("/v1/receipts", json={"receipts": items})
    assert response.status_code == 200, response.text
    return response.json()


def node_view(api, node=NODE):
    response = api.get(f"/v1/nodes/{node.address}")
    assert response.status_code == 200, response.text
    return response.json()


def test_accepts_valid_receipts_and_counts_them_once(api):
    items = [make_receipt(NODE, CLIENT, step=i, price=7) for i in range(5)]
    result = post(api, [receipt_item(*i) for i in items])
    assert result["accepted"] == 5 and result["rejected"] == 0
    before = node_view(api)
    assert before["receipts_count"] == 5 and int(before["claimed"]) == 5 * 4 * 7
    assert before["earned"] == "0"  # a node's own claims: work only once its client countersigned and paid
    again = post(api, [receipt_item(*i) for i in items])  # a node retrying after a timeout
    assert again["duplicates"] == 5 and again["accepted"] == 0
    after = node_view(api)
    assert after["receipts_count"] == 5 and after["claimed"] == before["claimed"]


def test_forgeries_are_rejected_with_reasons(api):
    mallory = Party()
    good, fp = make_receipt(NODE, CLIENT)
    # signed by someone else, claiming to be NODE
    forged = eip712.sign_receipt(good.receipt, mallory.key, domain_from_deployment())
    # content changed after signing
    tampered = R.SignedReceipt(
        R.Receipt(**{**good.receipt.__dict__, "tokens": 400, "amount": 400 * 1000}), good.signature
    )
    # garbage signature bytes
    garbage = R.SignedReceipt(good.receipt, b"\x00" * 64 + b"\x1b")  # r = s = 0
    # amount != tokens * price, properly signed
    wrong_amount = make_receipt(NODE, CLIENT, amount=1)
    # signed for another chain
    other_domain = make_receipt(NODE, CLIENT, domain=eip712.make_domain(1, eip712.ZERO_ADDRESS))
    # fingerprint bytes that are not the committed ones
    swapped_fp = (good, fingerprints.ComputeSpec("bfloat16").encode())
    result = post(
        api,
        [
            receipt_item(forged, fp),
            receipt_item(tampered, fp),
            receipt_item(garbage, fp),
            receipt_item(*wrong_amount),
            receipt_item(*other_domain),
            receipt_item(*swapped_fp),
        ],
    )
    reasons = [r["reason"] for r in result["results"]]
    assert reasons == [
        "wrong_signer",
        "wrong_signer",
        "bad_signature",
        "wrong_amount",
        "wrong_signer",
        "bad_fingerprint",
    ]
    assert result["accepted"] == 0 and all(r["message"] for r in result["results"])


def test_receipts_no_verifier_could_recompute_are_refused(api):
    """A node that names no precision (the old 16-byte-per-token fingerprint, empty bytes) or an unknown one would
    make every audit of its steps inconclusive: its receipts are refused at intake, so they earn nothing."""
    unknown_dtype = fingerprints.ComputeSpec("float16").encode()[:3] + bytes([9]) + b"\0\0\0\0"
    old_style = b"NF1" + bytes(5) + bytes(16 * 4)
    items = [make_receipt(NODE, CLIENT, descriptor=raw) for raw in (b"", unknown_dtype, old_style)]
    backward = make_receipt(NODE, CLIENT, descriptor=b"", kind=int(R.ReceiptKind.BACKWARD))  # never audited
    good = make_receipt(NODE, CLIENT, descriptor=fingerprints.ComputeSpec("bfloat16", device="cuda").encode())
    result = post(api, [receipt_item(*item) for item in items + [backward, good]])
    assert [r["reason"] for r in result["results"]] == ["bad_fingerprint"] * 3 + [None, None]
    assert "compute descriptor" in result["results"][0]["message"]


def test_receipts_from_the_future_or_past_the_evidence_window_are_refused(api):
    now = int(time.time())
    ahead = make_receipt(NODE, CLIENT, timestamp=now + 3600)  # a node clock an hour fast
    old = make_receipt(NODE, CLIENT, timestamp=now - 13 * 3600)  # the chain would refuse it as evidence
    fine = make_receipt(NODE, CLIENT, timestamp=now - 3600)
    result = post(api, [receipt_item(*ahead), receipt_item(*old), receipt_item(*fine)])
    assert [r["reason"] for r in result["results"]] == ["future_receipt", "stale_receipt", None]
    assert "ahead of the ledger's clock" in result["results"][0]["message"]
    assert "evidence window" in result["results"][1]["message"] and result["accepted"] == 1


def test_conflicting_receipt_is_rejected_and_kept_as_evidence(api, settings):
    session_id = os.urandom(32)
    first = make_receipt(NODE, CLIENT, session_id=session_id, step=3)
    same_input = first[0].receipt.input_commitment
    second = make_receipt(NODE, CLIENT, session_id=session_id, step=3, input_commitment=same_input)  # another output
    same_output_other_time = eip712.sign_receipt(
        R.Receipt(**{**first[0].receipt.__dict__, "timestamp": first[0].receipt.timestamp + 5}),
        NODE.key,
        domain_from_deployment(),
    )
    assert post(api, [receipt_item(*first)])["accepted"] == 1
    result = post(api, [receipt_item(*second), receipt_item(same_output_other_time, first[1])])
    assert [r["reason"] for r in result["results"]] == ["conflict", "replay"]
    post(api, [receipt_item(*second)])  # resubmitting the evidence does not duplicate it
    with session_scope(get_engine(settings.database_url)) as session:
        conflicts = crud.list_conflicts(session, node=NODE.address)
        assert len(conflicts) == 1 and conflicts[0].status == "pending"
        stored = crud.signed_receipt_of(session.get(crud.Receipt, conflicts[0].receipt_id))
        assert stored == first[0] and eip712.recover_receipt_signer(stored, domain_from_deployment()) == NODE.address
    assert len(node_view(api)["conflicts"]) == 1


def test_a_conflict_inside_one_batch_is_kept_as_evidence_and_the_rest_is_stored(api, settings):
    """Both receipts of a double-sign in the same POST (as a node's background flush sends them): the first is
    stored, the second is evidence, and the batch's other receipts are stored too (it once failed as a whole)."""
    node = Party()
    session_id = os.urandom(32)
    first = make_receipt(node, CLIENT, session_id=session_id, step=0, kind=1)
    second = make_receipt(
        node, CLIENT, session_id=session_id, step=0, kind=1, input_commitment=first[0].receipt.input_commitment
    )
    others = [make_receipt(node, CLIENT, step=i) for i in range(3)]
    result = post(api, [receipt_item(*first), receipt_item(*second)] + [receipt_item(*o) for o in others])
    assert [r["status"] for r in result["results"]] == ["accepted", "rejected"] + ["accepted"] * 3
    assert result["results"][1]["reason"] == "conflict"
    with session_scope(get_engine(settings.database_url)) as session:
        conflicts = crud.list_conflicts(session, node=node.address)
        assert len(conflicts) == 1
        assert crud.signed_receipt_of(session.get(crud.Receipt, conflicts[0].receipt_id)) == first[0]
    assert node_view(api, node)["receipts_count"] == 4
    # and in one transaction too (no per-item fallback needed)
    from nectar.ledger.intake import check_receipt

    pair = [make_receipt(node, CLIENT, session_id=os.urandom(32), step=0, kind=1) for _ in range(2)]
    pair[1] = make_receipt(
        node,
        CLIENT,
        session_id=pair[0][0].receipt.session_id,
        step=0,
        kind=1,
        input_commitment=pair[0][0].receipt.input_commitment,
    )
    with session_scope(get_engine(settings.database_url)) as session:
        verdicts = crud.store_receipts(
            session, checked=[check_receipt(s, fp, domain_from_deployment()) for s, fp in pair]
        )
    assert [v[0] for v in verdicts] == ["accepted", "rejected"]


def test_another_input_under_the_same_work_is_no_evidence_against_the_node(api, settings):
    """A client that sends two inputs under one (session, step) gets two honest receipts: the chain refuses them as a
    double-sign (issue 20), so the ledger must not keep them as evidence either (it did before: a conflict)."""
    node = Party()
    session_id = os.urandom(32)
    first = make_receipt(node, CLIENT, session_id=session_id, step=2)
    other_input = make_receipt(node, CLIENT, session_id=session_id, step=2)  # a fresh input commitment
    other_client = make_receipt(
        node, Party(), session_id=session_id, step=2, input_commitment=first[0].receipt.input_commitment
    )
    assert post(api, [receipt_item(*first)])["accepted"] == 1
    result = post(api, [receipt_item(*other_input), receipt_item(*other_client)])
    assert [r["reason"] for r in result["results"]] == ["replay", "replay"]
    with session_scope(get_engine(settings.database_url)) as session:
        assert crud.list_conflicts(session, node=node.address) == []
    assert len(node_view(api, node)["conflicts"]) == 0


def test_malformed_batches_get_422_and_store_nothing(api):
    count = node_view(api)["receipts_count"]
    good = receipt_item(*make_receipt(NODE, CLIENT))
    cases = [
        {"receipts": [good, {**good, "signature": "0xzz"}]},
        {"receipts": [good, {**good, "receipt": {**good["receipt"], "sessionId": "0x12"}}]},
        {"receipts": [good, {k: v for k, v in good.items() if k != "fingerprintBytes"}]},
        {"receipts": [good, {**good, "receipt": {**good["receipt"], "tokens": -1}}]},
        {"receipts": "not a list"},
        {"receipts": []},
        {},
    ]
    for body in cases:
        response = api.post("/v1/receipts", json=body)
        assert response.status_code == 422, (body, response.text)
    response = api.post("/v1/receipts", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    detail = api.post("/v1/receipts", json=cases[0]).json()["detail"]
    assert detail["items"][0]["index"] == 1 and "nothing" in detail["message"]
    assert node_view(api)["receipts_count"] == count
    assert api.get("/v1/nodes/0x1234").status_code == 422
    assert api.get(f"/v1/nodes/{Party().address}").status_code == 404


def test_vouchers_keep_the_highest_and_reject_stale_and_forged(api):
    client, node = Party(), Party()
    results = [
        api.post("/v1/vouchers", json={"vouchers": [make_voucher(client, node, a).to_json()]}).json()
        for a in (100, 250, 250, 200)
    ]
    assert [r["results"][0]["status"] for r in results] == ["accepted", "accepted", "duplicate", "rejected"]
    assert results[3]["results"][0]["reason"] == "stale_voucher"
    forged = eip712.sign_voucher(
        R.Voucher(client.address, node.address, 1, 10**9), Party().key, domain_from_deployment()
    )
    result = api.post("/v1/vouchers", json={"vouchers": [forged.to_json()]}).json()
    assert result["results"][0]["reason"] == "wrong_signer"
    assert api.post("/v1/vouchers", json={"vouchers": [{"voucher": {}, "signature": "0x"}]}).status_code == 422
    with session_scope(get_engine(api.app.state.ledger.settings.database_url)) as session:
        [stored] = crud.list_vouchers(session, client=client.address)
        assert stored.cumulative_amount == 250 and stored.settled_amount == 0


def test_concurrent_submissions_store_each_receipt_once(api):
    node = Party()
    items = [receipt_item(*make_receipt(node, CLIENT, step=i)) for i in range(60)]
    verdicts = []

    def submit(chunk):
        verdicts.extend(r["status"] for r in post(api, chunk)["results"])

    threads = [threading.Thread(target=submit, args=(items[i % 3 * 20 :][:40],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verdicts.count("accepted") == 60 and set(verdicts) <= {"accepted", "duplicate"}
    assert node_view(api, node)["receipts_count"] == 60


def test_close_epoch_freezes_receipts_under_a_verifiable_root(api, settings):
    headers = {"Authorization": f"Bearer {settings.admin_token}"}
    assert api.post("/v1/epochs/close").status_code == 401
    post(api, [receipt_item(*make_receipt(NODE, CLIENT, step=100 + i)) for i in range(3)])
    closed = api.post("/v1/epochs/close", headers=headers).json()["closed"]
    assert closed["status"] == "closed" and closed["receipt_count"] >= 3
    with session_scope(get_engine(settings.database_url)) as session:
        leaves = crud.epoch_leaves(session, epoch=closed["number"])
        assert len(leaves) == closed["receipt_count"]
        assert "0x" + merkle_root(leaves).hex() == closed["root"]
        assert verify_proof(merkle_root(leaves), leaves[1], merkle_proof(leaves, 1))
    # a receipt arriving now goes to the next epoch; closing again with nothing new closes nothing
    later = post(api, [receipt_item(*make_receipt(NODE, CLIENT, step=999))])
    assert later["accepted"] == 1
    epochs = api.get("/v1/epochs").json()
    assert epochs[0]["number"] == closed["number"] + 1 and epochs[0]["status"] == "collecting"


def test_reputation_and_reports(api):
    node, client = Party(), Party()
    post(api, [receipt_item(*make_receipt(node, client))])
    from nectar.wire.ledger_api import LedgerClient

    ledger = LedgerClient("http://testserver")
    ledger._http = api  # the TestClient speaks the same httpx API
    try:
        ledger.report(private_key=client.key, node=node.address, success=True, latency_ms=50)
        raise AssertionError("a client that never paid this node must not move its reputation")
    except Exception as e:
        assert "403" in str(e)
    api.post("/v1/vouchers", json={"vouchers": [make_voucher(client, node, 10**15).to_json()]})
    try:
        ledger.report(private_key=client.key, node=node.address, success=True, latency_ms=50)
        raise AssertionError("a voucher the chain has not paid vouches for nothing")
    except Exception as e:
        assert "403" in str(e)
    with session_scope(get_engine(api.app.state.ledger.settings.database_url)) as session:
        for voucher in crud.list_vouchers(session, client=client.address):  # as the worker records a settlement
            voucher.settled_amount = voucher.cumulative_amount
    before = {n["address"]: n for n in ledger.reputation()}[node.address]
    for _ in range(3):  # the rate bound's burst
        ledger.report(
            private_key=client.key, node=node.address, success=True, online=True, latency_ms=40, throughput=200
        )
    after = {n["address"]: n for n in ledger.reputation()}[node.address]
    assert after["score"] > before["score"] and after["new"] is True
    assert after["components"]["success"] == 0.8  # (3 + 1) / (3 + 2): smoothed


def test_a_countersigned_copy_is_merged_and_counts_once_paid(api, settings):
    """Without a chain nothing backs a client, so countersigned work waits; once the chain has paid the client's
    voucher (recorded as the worker does), it counts, once, however often either side resubmits."""
    node, client = Party(), Party()
    domain = domain_from_deployment()
    items = [make_receipt(node, client, step=i, price=5) for i in range(3)]
    assert post(api, [receipt_item(*i) for i in items])["accepted"] == 3  # the node's own
    countersigned = [
        {
            **receipt_item(s, fp),
            "clientSignature": "0x" + eip712.countersign_receipt(s.receipt, client.key, domain).hex(),
        }
        for s, fp in items
    ]
    result = post(api, countersigned)
    assert result["duplicates"] == 3 and "countersignature is recorded" in result["results"][0]["message"]
    assert node_view(api, node)["work_steps"] == 0  # nothing backs the client yet
    api.post("/v1/vouchers", json={"vouchers": [make_voucher(client, node, 2 * 4 * 5).to_json()]})
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        for voucher in crud.list_vouchers(session, client=client.address):  # as the worker records a settlement
            voucher.settled_amount = voucher.cumulative_amount
        assert crud.count_work(session, client=client.address, node=node.address, limits=settings.work_limits) == 2
    post(api, countersigned)  # resubmissions count nothing again
    view = node_view(api, node)
    assert view["work_steps"] == 2 and int(view["earned"]) == 2 * 4 * 5  # the third is not paid for
    with session_scope(engine) as session:
        assert sorted(r.work for r in crud.list_receipts(session, node=node.address)) == ["counted"] * 2 + ["pending"]


def test_the_client_node_book_is_bounded_and_the_least_worked_row_gives_way(settings):
    from dataclasses import replace

    limits = replace(settings.work_limits, max_clients_per_node=3, max_nodes_per_client=2)
    node, clients = Party().address, [Party().address for _ in range(5)]
    with session_scope(get_engine(settings.database_url)) as session:
        for index, client in enumerate(clients[:3]):
            crud.client_node(session, client=client, node=node, limits=limits).counted_steps = 10 - index
        crud.client_node(session, client=clients[3], node=node, limits=limits)  # a 4th client for this node
        rows = session.scalars(crud.select(crud.ClientNode).where(crud.ClientNode.node == node)).all()
        assert sorted(r.client for r in rows) == sorted(clients[:2] + clients[3:4])  # the least worked went
        other_nodes = [Party().address for _ in range(3)]
        for other in other_nodes:  # a 3rd node for this client
            crud.client_node(session, client=clients[4], node=other, limits=limits)
        rows = session.scalars(crud.select(crud.ClientNode).where(crud.ClientNode.client == clients[4])).all()
        assert len(rows) == 2


def test_public_views_never_show_session_ids(api, settings):
    """Issue 21: session ids link a user's steps and name what an audit fetches; the public views never show them
    (the node's audit call answers registered verifiers only), the admin token sees them."""
    node = Party()
    items = [make_receipt(node, CLIENT, step=i) for i in range(3)]
    assert post(api, [receipt_item(*i) for i in items])["accepted"] == 3
    secrets = {i[0].receipt.session_id.hex() for i in items}
    public = [
        api.get(f"/v1/nodes/{node.address}"),
        api.get(f"/v1/nodes/{node.address}?limit=500"),
        api.get("/v1/reputation"),
        api.get("/v1/epochs"),
        api.get("/v1/config"),
        api.get("/v1/verifiers"),
    ]
    for response in public:
        assert response.status_code == 200, response.text
        text = response.text.lower()
        assert "session_id" not in text and not any(s in text for s in secrets), response.url
    admin = api.get(f"/v1/nodes/{node.address}", headers={"Authorization": f"Bearer {settings.admin_token}"})
    assert {r["session_id"][2:] for r in admin.json()["recent_receipts"]} == secrets
    assert api.get("/v1/verifiers").json() == {"verifiers": [], "source": "settings"}  # no chain, no verifier key
