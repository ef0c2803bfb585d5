"""Receipts/vouchers: EIP-712 digests and signatures identical to eth-account, strict parsing, tensor commitments."""

import os

import pytest
import torch
from eth_account import Account
from eth_account.messages import encode_typed_data

from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as R

DOMAIN = eip712.make_domain(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3")


def make_receipt(**overrides) -> R.Receipt:
    fields = dict(
        session_id=os.urandom(32),
        step=3,
        kind=R.ReceiptKind.INFERENCE,
        model_id=R.model_id_hash("tiny-llama"),
        block_start=0,
        block_end=4,
        node=Account.create().address,
        client=Account.create().address,
        tokens=7,
        price=10**12,
        amount=7 * 10**12,
        input_commitment=os.urandom(32),
        output_commitment=os.urandom(32),
        fingerprint=os.urandom(32),
        timestamp=1_700_000_000,
    )
    fields.update(overrides)
    return R.Receipt(**fields)


def test_receipt_signature_matches_eth_account():
    account = Account.create()
    receipt = make_receipt(node=account.address, price=2**127, amount=2**127 - 1, step=2**64 - 1)
    ours = eip712.sign_receipt(receipt, account.key, DOMAIN)
    reference = Account.sign_typed_data(
        account.key, full_message=eip712.full_typed_message("Receipt", receipt.to_message(), DOMAIN)
    )
    assert ours.signature == bytes(reference.signature)
    assert eip712.receipt_digest(receipt, DOMAIN) == bytes(reference.message_hash)
    assert eip712.recover_receipt_signer(ours, DOMAIN) == account.address
    signable = encode_typed_data(full_message=eip712.full_typed_message("Receipt", receipt.to_message(), DOMAIN))
    assert Account.recover_message(signable, signature=ours.signature) == account.address


def test_voucher_signature_matches_eth_account():
    account = Account.create()
    voucher = R.Voucher(account.address, Account.create().address, 5, 123_456_789 * 10**18)
    ours = eip712.sign_voucher(voucher, account.key.hex(), DOMAIN)
    reference = Account.sign_typed_data(
        account.key, full_message=eip712.full_typed_message("Voucher", voucher.to_message(), DOMAIN)
    )
    assert ours.signature == bytes(reference.signature)
    assert eip712.recover_voucher_signer(ours, DOMAIN) == account.address


def test_domain_changes_the_signer_a_verifier_recovers():
    account = Account.create()
    signed = eip712.sign_receipt(make_receipt(node=account.address), account.key, DOMAIN)
    other = eip712.make_domain(1, DOMAIN["verifyingContract"])
    assert eip712.recover_receipt_signer(signed, other) != account.address


def test_tampered_receipt_recovers_someone_else():
    account = Account.create()
    signed = eip712.sign_receipt(make_receipt(node=account.address), account.key, DOMAIN)
    forged = R.SignedReceipt(
        R.Receipt(**{**signed.receipt.__dict__, "amount": signed.receipt.amount + 1}), signed.signature
    )
    assert eip712.recover_receipt_signer(forged, DOMAIN) != account.address


def test_malleable_and_malformed_signatures_rejected():
    account = Account.create()
    signed = eip712.sign_receipt(make_receipt(node=account.address), account.key, DOMAIN)
    r, s, v = signed.signature[:32], int.from_bytes(signed.signature[32:64], "big"), signed.signature[64]
    high_s = r + (eip712._SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    with pytest.raises(eip712.InvalidSignature, match="malleable"):
        eip712.recover_receipt_signer(R.SignedReceipt(signed.receipt, high_s), DOMAIN)
    with pytest.raises(eip712.InvalidSignature, match="65 bytes"):
        eip712.recover_receipt_signer(R.SignedReceipt(signed.receipt, signed.signature[:64]), DOMAIN)
    with pytest.raises(eip712.InvalidSignature, match="recovery byte"):
        eip712.recover_receipt_signer(R.SignedReceipt(signed.receipt, signed.signature[:64] + b"\x05"), DOMAIN)


def test_json_round_trip_and_strict_parsing():
    account = Account.create()
    signed = eip712.sign_receipt(
        make_receipt(node=account.address, price=2**100, amount=2**100 * 7), account.key, DOMAIN
    )
    data = signed.to_json()
    assert isinstance(data["receipt"]["amount"], str)  # uint128 survives JavaScript clients
    assert R.SignedReceipt.from_json(data) == signed
    assert R.Receipt.from_message(signed.receipt.to_message()) == signed.receipt
    bad = dict(data["receipt"], sessionId="0x1234")
    with pytest.raises(ValueError, match="sessionId must be 32 bytes"):
        R.Receipt.from_json(bad)
    with pytest.raises(ValueError, match="missing fields: step"):
        R.Receipt.from_json({k: v for k, v in data["receipt"].items() if k != "step"})
    with pytest.raises(ValueError, match="node must be a 20-byte hex address"):
        R.Receipt.from_json(dict(data["receipt"], node="0xnothex"))
    with pytest.raises(ValueError, match="tokens must be an integer in"):
        R.Receipt.from_json(dict(data["receipt"], tokens=2**32))
    with pytest.raises(ValueError, match="kind must be one of"):
        R.Receipt.from_json(dict(data["receipt"], kind=7))
    with pytest.raises(ValueError, match="is empty"):
        R.Receipt.from_json(dict(data["receipt"], blockStart=4, blockEnd=4))
    voucher = eip712.sign_voucher(R.Voucher(account.address, account.address, 1, 2**120), account.key, DOMAIN)
    assert R.SignedVoucher.from_json(voucher.to_json()) == voucher


def test_domain_from_deployment_reads_the_deployment_file(tmp_path, monkeypatch):
    from nectar.deployment import domain_from_deployment

    monkeypatch.setenv("NECTAR_HOME", str(tmp_path))
    monkeypatch.delenv("NECTAR_DEPLOYMENT", raising=False)
    assert domain_from_deployment() == eip712.make_domain(31337, eip712.ZERO_ADDRESS)
    (tmp_path / "deployment.json").write_text(
        '{"chainId": 31337, "contracts": {"Settlement": {"address": "0x5fbdb2315678afecb367f032d93f642f64180aa3"}}}'
    )
    assert domain_from_deployment() == DOMAIN
    assert domain_from_deployment(tmp_path / "deployment.json") == DOMAIN
    (tmp_path / "broken.json").write_text("{not json")
    assert domain_from_deployment(tmp_path / "broken.json") == eip712.make_domain(31337, eip712.ZERO_ADDRESS)
    with pytest.raises(ValueError, match="unreadable"):
        domain_from_deployment(tmp_path / "broken.json", strict=True)


def test_wire_reads_no_files_and_no_environment():
    """The signing domain and the peer list are handed in: nothing under wire/ reads a file or os.environ."""
    import pathlib
    import re

    import nectar.wire

    root = pathlib.Path(nectar.wire.__file__).parent
    offenders = [
        f"{path.name}: {line.strip()}"
        for path in sorted(root.glob("*.py"))
        if path.name != "event_loop.py"
        for line in path.read_text().splitlines()
        if re.search(r"os\.environ|os\.getenv|read_text\(|open\(|deployment_path", line)
    ]
    assert offenders == []


def test_commit_tensor_is_stable_and_sensitive():
    t = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert fingerprints.commit_tensor(t) == fingerprints.commit_tensor(t.clone())
    assert fingerprints.commit_tensor(t.transpose(0, 1).contiguous().transpose(0, 1)) == fingerprints.commit_tensor(
        t
    )  # layout-free
    assert fingerprints.commit_tensor(t.float()) != fingerprints.commit_tensor(t)  # dtype is committed
    assert fingerprints.commit_tensor(t.reshape(5, 2, 16)) != fingerprints.commit_tensor(t)  # shape is committed
    u = t.clone()
    u[1, 4, 15] += 1
    assert fingerprints.commit_tensor(u) != fingerprints.commit_tensor(t)
    # same bytes after a round trip through raw bytes (what the wire does)
    raw = t.view(torch.uint8).numpy().tobytes()
    back = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch.bfloat16).reshape(2, 5, 16)
    assert fingerprints.commit_tensor(back) == fingerprints.commit_tensor(t)


def test_receipt_leaf_is_hash_of_struct_hash():
    receipt = make_receipt()
    assert eip712.receipt_leaf(receipt) == R.keccak256(eip712.receipt_struct_hash(receipt))
