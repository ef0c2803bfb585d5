"""Checks a submitted receipt or voucher on its own (no database): parsing, signature, signer, amount, fingerprint.

The HTTP routes call these before ``crud`` classifies what is left against stored state (replays, conflicts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nectar.wire.eip712 import (  # typed_digest: one struct hash serves the signature and the leaf
    InvalidSignature,
    receipt_struct_hash,
    recover_countersigner,
    recover_digest_signer,
    recover_voucher_signer,
    typed_digest,
)
from nectar.wire.fingerprints import ComputeSpec, fingerprint_hash
from nectar.wire.receipts import ReceiptKind, SignedReceipt, SignedVoucher, keccak256

logger = logging.getLogger(__name__)


_AUDITED_KINDS = (ReceiptKind.INFERENCE, ReceiptKind.FORWARD)


def _descriptor_problem(raw: bytes | None) -> str:
    try:
        ComputeSpec.decode(raw or b"")
    except ValueError as e:
        return str(e)
    return ""


class Malformed(ValueError):
    """A submission that does not parse; the route answers 422 with the item's index and this message."""


class Reason:
    BAD_SIGNATURE = "bad_signature"
    WRONG_SIGNER = "wrong_signer"
    WRONG_AMOUNT = "wrong_amount"
    BAD_FINGERPRINT = "bad_fingerprint"
    REPLAY = "replay"
    CONFLICT = "conflict"
    STALE_VOUCHER = "stale_voucher"
    NOT_STAKED = "node_not_staked"  # the stake gate: the node is not registered with the minimum stake
    STALE_RECEIPT = "stale_receipt"  # older than the chain's evidence window: it proves nothing on chain any more
    FUTURE_RECEIPT = "future_receipt"  # dated ahead of the ledger's clock by more than the allowed skew
    UNSTORABLE = "unstorable"  # the database refused this one item (a ledger bug: it is logged with the item)
    BAD_COUNTERSIGNATURE = "bad_countersignature"  # clientSignature malformed or not by the receipt's client
    UNREGISTERED_FULL = "unregistered_full"  # a key the registry does not know has all the evidence rows it may keep


@dataclass
class CheckedReceipt:
    signed: SignedReceipt
    fingerprint: bytes | None
    leaf: bytes
    reason: str | None = None  # None: passed the stateless checks
    message: str = ""
    countersignature: bytes | None = None  # the receipt's client's, checked (None: the node's own submission)
    staked: bool = True  # the node passed the stake gate (set by the route for countersigned receipts)


def parse_receipt_item(item) -> tuple[SignedReceipt, bytes | None, bytes | None]:
    """(signed receipt, fingerprint bytes, client countersignature). A client's submission (with ``clientSignature``)
    may leave the fingerprint out (null); a node's must carry it."""
    try:
        signed = SignedReceipt.from_json(item)
        raw_cs = item.get("clientSignature")
        if raw_cs is not None and not isinstance(raw_cs, str):
            raise ValueError("clientSignature must be the hex of the client's 65-byte countersignature")
        countersignature = None if raw_cs is None else bytes.fromhex(raw_cs.removeprefix("0x"))
        raw_fp = item.get("fingerprintBytes")
        if raw_fp is None and countersignature is not None:
            return signed, None, countersignature
        if not isinstance(raw_fp, str):
            raise ValueError("fingerprintBytes (hex of the node's compute descriptor, '0x' if none) is required")
        return signed, bytes.fromhex(raw_fp.removeprefix("0x")), countersignature
    except (ValueError, TypeError, AttributeError) as e:
        raise Malformed(str(e)) from None


def check_receipt(
    signed: SignedReceipt,
    fingerprint: bytes | None,
    domain: dict,
    *,
    countersignature: bytes | None = None,
    now: float | None = None,
    max_age: float = 43_200.0,
    max_skew: float = 300.0,
) -> CheckedReceipt:
    """The stateless checks; with ``now`` (the ledger's clock, s) also the receipt's time: at most ``max_skew``
    ahead, at most ``max_age`` old (the chain refuses double-sign evidence older than its ``maxEvidenceAge``).
    A ``countersignature`` must be the receipt's client's (``eip712.countersign_receipt``)."""
    receipt = signed.receipt
    struct_hash = receipt_struct_hash(receipt)
    checked = CheckedReceipt(signed, fingerprint, keccak256(struct_hash), countersignature=countersignature)
    try:
        signer = recover_digest_signer(typed_digest(domain, struct_hash), signed.signature)
    except InvalidSignature as e:
        checked.reason, checked.message = Reason.BAD_SIGNATURE, str(e)
        return checked
    if signer != receipt.node:
        checked.reason = Reason.WRONG_SIGNER
        checked.message = f"signed by {signer}, not by the receipt's node {receipt.node} (forged or wrong domain)"
    elif receipt.amount != receipt.tokens * receipt.price:
        checked.reason = Reason.WRONG_AMOUNT
        checked.message = f"amount {receipt.amount} != tokens {receipt.tokens} * price {receipt.price}"
    elif fingerprint is not None and fingerprint_hash(fingerprint) != receipt.fingerprint:
        checked.reason = Reason.BAD_FINGERPRINT
        checked.message = "fingerprintBytes do not hash to the receipt's fingerprint"
    elif countersignature is not None and (
        problem := _countersignature_problem(struct_hash, countersignature, receipt.client, domain)
    ):
        checked.reason, checked.message = Reason.BAD_COUNTERSIGNATURE, problem
    elif fingerprint is not None and receipt.kind in _AUDITED_KINDS and (problem := _descriptor_problem(fingerprint)):
        # a step no verifier could recompute (no precision named, or an unknown one) would escape audits for free
        checked.reason = Reason.BAD_FINGERPRINT
        checked.message = (
            f"fingerprintBytes must be the node's compute descriptor (nectar.wire.fingerprints.ComputeSpec): "
            f"{problem}; run a node of this release"
        )
    elif now is not None and receipt.timestamp > now + max_skew:
        checked.reason = Reason.FUTURE_RECEIPT
        checked.message = (
            f"timestamp {receipt.timestamp} is {receipt.timestamp - now:.0f} s ahead of the ledger's clock (at most "
            f"{max_skew:.0f} s allowed): check the node's clock (NTP) and submit it once its time has come"
        )
    elif now is not None and receipt.timestamp < now - max_age:
        checked.reason = Reason.STALE_RECEIPT
        checked.message = (
            f"timestamp {receipt.timestamp} is {now - receipt.timestamp:.0f} s old, past the {max_age:.0f} s evidence "
            "window: submit receipts as they are signed (a node's payment policy does)"
        )
    return checked


def _countersignature_problem(struct_hash: bytes, countersignature: bytes, client: str, domain: dict) -> str | None:
    try:
        signer = recover_countersigner(struct_hash, countersignature, domain)
    except InvalidSignature as e:
        return f"clientSignature: {e}"
    if signer != client:
        return f"clientSignature is by {signer}, not by the receipt's client {client}; only the client countersigns"
    return None


def parse_voucher_item(item) -> SignedVoucher:
    try:
        return SignedVoucher.from_json(item)
    except (ValueError, TypeError, AttributeError) as e:
        raise Malformed(str(e)) from None


def check_voucher(signed: SignedVoucher, domain: dict) -> tuple[str | None, str]:
    try:
        signer = recover_voucher_signer(signed, domain)
    except InvalidSignature as e:
        return Reason.BAD_SIGNATURE, str(e)
    if signer != signed.voucher.client:
        return Reason.WRONG_SIGNER, f"signed by {signer}, not by the voucher's client {signed.voucher.client}"
    return None, ""


def bound_unregistered(
    checked: list[CheckedReceipt],
    *,
    unregistered: set[str],
    stored: dict[str, int],
    stored_total: int,
    known_leaves: set[bytes],
    per_key: int,
    total: int,
) -> None:
    """Refuses (``UNREGISTERED_FULL``) the new receipts of keys the registry does not know past ``per_key`` rows each
    and ``total`` rows for all such keys together. Nothing pays or counts such a receipt (vouchers to the key are
    refused, work needs stake) and no stake backs a slash, so they are evidence only, and free keys could otherwise
    fill the table. The rows already stored (the earliest evidence) stay; a resubmission of one (``known_leaves``)
    passes to the duplicate check. ``stored``: rows per key now; ``stored_total``: rows of all unregistered keys."""
    counts = dict(stored)
    for c in checked:
        node = c.signed.receipt.node
        if c.reason is not None or node not in unregistered or c.leaf in known_leaves:
            continue
        if counts.get(node, 0) >= per_key or stored_total >= total:
            c.reason = Reason.UNREGISTERED_FULL
            c.message = (
                f"node {node} is not registered on this ledger's deployment, and the ledger keeps at most "
                f"{per_key} receipts of such a key ({total} of all of them) as evidence; it has them. Register the "
                "node (`nectar operator register`), then resend"
            )
            continue
        counts[node] = counts.get(node, 0) + 1
        stored_total += 1
        known_leaves.add(c.leaf)  # the same receipt twice in one batch is one row
