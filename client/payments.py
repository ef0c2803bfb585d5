"""The client's wallet: checks every receipt it receives and pays each node with a cumulative voucher."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Sequence

import torch
from eth_account import Account

from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as schema

logger = logging.getLogger(__name__)


RECEIPT_MAX_SKEW_S = 120  # a receipt's timestamp must be this close to the client's clock when it is checked


class ReceiptError(Exception):
    """A node returned a receipt that does not match the work it did: the client treats the node as faulty."""


class _ChannelAllocator:
    """Fresh channel ids, two per storage slot: on chain, channels ``2k`` and ``2k + 1`` of one (client, node) share a
    slot, and settling both in one batch costs one slot write instead of two (docs/protocol.md). So the wallets one
    process opens for the same key (workers, concurrent sessions) take the two halves of a pair before a new pair
    is drawn; a random 62-bit pair keeps channels of separate processes and restarts apart."""

    def __init__(self):
        self._half_open: dict[str, int] = {}  # client address -> the free odd id of its last pair
        self._lock = threading.Lock()

    def forget(self) -> None:
        """Drops the half-used pairs: a forked child (prefork workers) must not take the odd id its siblings get."""
        self._half_open = {}
        self._lock = threading.Lock()

    def allocate(self, client: str) -> int:
        with self._lock:
            odd = self._half_open.pop(client, None)
            if odd is not None:
                return odd
            even = random.getrandbits(62) << 1
            self._half_open[client] = even | 1
            return even


_channels = _ChannelAllocator()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_channels.forget)


class Wallet:
    """Signs vouchers for one client key. ``channel_id`` is fresh per wallet, so cumulative amounts restart at 0;
    wallets of the same key in one process get the two channels of a slot pair (see ``_ChannelAllocator``).

    :param channel_id: a channel of the caller's choosing, e.g. ``base + worker`` for several processes paying from one
        key; it must never have been used by this key before (the chain would take its vouchers for replays)
    :param ledger: where receipts this wallet checked and accepts go, countersigned (``on_receipt(signed, descriptor,
        countersignature)``: ``nectar.wire.ledger_api.LedgerPaymentPolicy`` posts them in the background), so a node
        cannot keep its steps from the ledger's audits; None (no ledger) signs nothing more
    :param voucher_interval: how long a voucher may be reused for a node that announces a credit limit
        (``voucher_for``); 0 signs one whenever more is owed
    """

    def __init__(
        self,
        private_key: str | None = None,
        *,
        domain: dict,
        channel_id: int | None = None,
        ledger=None,
        voucher_interval: float = 0.25,
    ):
        self.ledger = ledger
        self.private_key = private_key or Account.create().key.hex()
        self.address = eip712.address_of(self.private_key)
        self.domain = domain  # EIP-712: from the deployment (nectar.deployment.domain_from_deployment)
        self.channel_id = _channels.allocate(self.address) if channel_id is None else channel_id
        self._owed: dict[str, int] = {}
        self._partners: dict[str, str] = {}  # node -> the node whose channel shares its slot (itself by default)
        self.receipts: list[schema.SignedReceipt] = []
        self.keep_receipts: int | None = None  # keep only about the last this many (a long-running gateway's bound)
        self.voucher_interval = voucher_interval
        self._last_voucher: dict[str, tuple[int, float, dict]] = {}  # node -> (amount, signed at, the voucher)
        self._lock = threading.Lock()

    def check_receipt(
        self,
        data: dict,
        *,
        node_address: str,
        price_per_block: int,
        start: int,
        end: int,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        session_id: bytes | None = None,
        verify: bool = True,
        descriptor: bytes | None = None,
        dtype: str | None = None,
        quant: str | None = None,
        model_id: bytes | None = None,
        step: int | None = None,
        kind: int | None = None,
        now: float | None = None,
        adapter: bool | None = None,
    ) -> schema.SignedReceipt:
        """Checks a node's receipt against what was asked and received; raises ``ReceiptError`` on any difference.
        Once it passes, counts what is owed and (with a ledger) countersigns and queues it. ``descriptor``: the compute
        descriptor the node sent with it (the wire's ``fingerprint``: checked against the receipt and the node's
        announced ``dtype`` and ``quant``, and forwarded). ``model_id``/``step``/``kind``: the
        model (``model_id_hash``), step number and kind asked for: a receipt for other work could not be audited
        against this step (a cheater's way to evade audits). ``now``: the time its timestamp must be near
        (``RECEIPT_MAX_SKEW_S``; the ledger judges whether audits came in time by it). ``adapter``: whether the step
        was asked with a LoRA adapter: its descriptor must bind one then, and none otherwise."""
        try:
            signed = schema.SignedReceipt.from_json(data)
        except Exception as e:
            raise ReceiptError(f"malformed receipt: {e}")
        receipt = signed.receipt
        struct_hash = None
        if verify:
            struct_hash = eip712.receipt_struct_hash(receipt)  # one hash serves the check and the countersignature
            signer = eip712.recover_digest_signer(eip712.typed_digest(self.domain, struct_hash), signed.signature)
            problems = []
            if signer.lower() != node_address.lower():
                problems.append(f"signed by {signer}, the node announced {node_address}")
            if (receipt.block_start, receipt.block_end) != (start, end):
                problems.append(f"span {receipt.block_start}:{receipt.block_end} != requested {start}:{end}")
            if receipt.client.lower() != self.address.lower():
                problems.append("receipt names another client")
            if receipt.price != price_per_block * (end - start) or receipt.amount != receipt.tokens * receipt.price:
                problems.append(f"price {receipt.price} / amount {receipt.amount} differ from the announced price")
            if receipt.tokens != inputs.shape[0] * inputs.shape[1]:
                problems.append(f"charges {receipt.tokens} tokens for {inputs.shape[0] * inputs.shape[1]}")
            if receipt.input_commitment != fingerprints.commit_tensor(inputs):
                problems.append("input commitment does not match what was sent")
            if receipt.output_commitment != fingerprints.commit_tensor(outputs):
                problems.append("output commitment does not match what was received")
            if session_id is not None and receipt.session_id != session_id.rjust(32, b"\0"):
                problems.append("receipt names another session")
            problems += _compute_problems(receipt, descriptor, dtype, adapter=adapter, quant=quant)
            if model_id is not None and receipt.model_id != bytes(model_id):
                problems.append(f"receipt names model 0x{receipt.model_id.hex()[:16]}..., not the one asked for")
            if step is not None and receipt.step != step:
                problems.append(f"receipt is for step {receipt.step}, not the step {step} asked for")
            if kind is not None and receipt.kind != int(kind):
                problems.append(f"receipt is of kind {receipt.kind}, not {int(kind)} ({schema.ReceiptKind(kind).name})")
            now = time.time() if now is None else now
            if abs(receipt.timestamp - now) > RECEIPT_MAX_SKEW_S:
                problems.append(
                    f"receipt dated {receipt.timestamp}, {receipt.timestamp - now:+.0f}s off this client's clock "
                    f"(at most {RECEIPT_MAX_SKEW_S}s): the node's clock is wrong or it backdates its receipts"
                )
            if problems:
                raise ReceiptError("; ".join(problems))
        with self._lock:
            self._owed[receipt.node] = self._owed.get(receipt.node, 0) + receipt.amount
            self.receipts.append(signed)
            if self.keep_receipts is not None and len(self.receipts) > 2 * self.keep_receipts:
                del self.receipts[: -self.keep_receipts]  # amortized: one cut per keep_receipts receipts
        if self.ledger is not None and struct_hash is not None:  # only what was checked is vouched for
            digest = eip712.acceptance_digest(struct_hash, self.domain)
            self.ledger.on_receipt(signed, descriptor, eip712.sign_digest(digest, self.private_key))
        return signed

    def owed(self, node_address: str) -> int:
        node = schema.checksum_address(node_address, "node")
        with self._lock:
            return self._owed.get(node, 0)

    def pair(self, route: Sequence[str]) -> None:
        """Pairs the nodes of a route that have no partner yet, neighbours first: a pair's two channels share one
        storage slot on chain, so settling them costs ~2,400 gas less per voucher. A node keeps its partner (part of
        its channel) for the wallet's life; a node left alone partners with itself."""
        with self._lock:
            nodes = (schema.checksum_address(n, "node") for n in route)
            free = list(dict.fromkeys(n for n in nodes if n not in self._partners))
            for a, b in zip(free[0::2], free[1::2]):
                self._partners[a], self._partners[b] = b, a

    def partner_of(self, node_address: str) -> str:
        node = schema.checksum_address(node_address, "node")
        with self._lock:
            return self._partners.setdefault(node, node)

    def voucher_for(self, node_address: str, *, credit_limit: int = 0, fresh: bool = False) -> dict | None:
        """A voucher covering everything received from this node so far (None if nothing is owed).

        Signing one costs about 0.1 ms and its check at the node as much, for every step of every session. So the
        last voucher signed for the node is reused while it is younger than ``voucher_interval`` and what it leaves
        unpaid stays under a quarter of the node's announced ``credit_limit`` (0, unknown: never); ``fresh`` (a
        session's closing payment) always covers everything."""
        node = schema.checksum_address(node_address, "node")
        now = time.monotonic()
        with self._lock:
            amount = self._owed.get(node, 0)
            last = self._last_voucher.get(node)
        if amount <= 0:
            return None
        if last is not None and (
            last[0] == amount
            or (not fresh and now - last[1] < self.voucher_interval and 4 * (amount - last[0]) < credit_limit)
        ):
            return last[2]
        voucher = schema.Voucher(
            client=self.address,
            node=node,
            channel_id=self.channel_id,
            cumulative_amount=amount,
            partner=self.partner_of(node),
        )
        signed = eip712.sign_voucher(voucher, self.private_key, self.domain).to_json()
        with self._lock:
            if node not in self._last_voucher or self._last_voucher[node][0] < amount:
                self._last_voucher[node] = (amount, now, signed)
        return signed

    @property
    def total_paid(self) -> int:
        with self._lock:  # concurrent sessions add nodes to _owed: never iterate it while one does
            return sum(self._owed.values())


def _compute_problems(
    receipt: schema.Receipt,
    descriptor: bytes | None,
    dtype: str | None,
    *,
    adapter: bool | None = None,
    quant: str | None = None,
) -> list[str]:
    """The receipt must commit to a precision an audit can recompute (its compute descriptor), the one the node
    announced: a receipt no verifier could check would make the step unauditable, yet paid."""
    if fingerprints.fingerprint_hash(descriptor or b"") != receipt.fingerprint:
        return ["the compute descriptor sent with the receipt does not hash to its fingerprint"]
    try:
        spec = fingerprints.ComputeSpec.decode(descriptor or b"")
    except ValueError as e:
        return [f"the receipt names no precision an audit could recompute ({e})"]
    if dtype is not None and spec.dtype != dtype:
        return [f"the receipt commits to {spec.dtype} computation, the node announced {dtype}"]
    if quant is not None and spec.quantization != quant:
        return [f"the receipt commits to {spec.quantization} weights, the node announced {quant}"]
    if descriptor and adapter is not None and bool(spec.adapter) != adapter:
        # a base step signed as an adapter's (or the reverse) would be audited as other work than was asked
        asked = "with a LoRA adapter" if adapter else "without an adapter"
        return [f"the receipt's compute descriptor {'binds' if spec.adapter else 'lacks'} an adapter; asked {asked}"]
    return []
