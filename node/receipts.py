"""Signing proof-of-inference receipts and tracking what each client owes this node.

The node signs one receipt per step it computes; clients answer with cumulative vouchers. ``CreditLedger`` refuses
work once a client's unpaid amount would pass the node's credit limit, so a client that stops paying costs the node
at most that limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

import torch

from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as schema
from nectar.wire.protocol import ErrorCode, NodeRPCError

logger = logging.getLogger(__name__)


class ReceiptSigner:
    """Builds and signs receipts for one node and model. Thread-safe (stateless apart from its key)."""

    def __init__(self, *, private_key: str, model_id: str, price_per_token: int, domain: dict):
        self.private_key = private_key
        self.address = eip712.address_of(private_key)
        self.model_id = model_id
        self.model_hash = schema.model_id_hash(model_id)
        self.price_per_token = price_per_token
        self.domain = domain

    def price_for(self, start: int, end: int) -> int:
        return self.price_per_token * (end - start)

    def sign(
        self,
        *,
        session_id: bytes,
        step: int,
        kind: schema.ReceiptKind,
        start: int,
        end: int,
        client: str,
        tokens: int,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
    ) -> tuple[schema.SignedReceipt, bytes]:
        fingerprint = fingerprints.activation_fingerprint(outputs) if outputs.ndim == 3 else b""
        price = self.price_for(start, end)
        receipt = schema.Receipt(
            session_id=session_id,
            step=step,
            kind=int(kind),
            model_id=self.model_hash,
            block_start=start,
            block_end=end,
            node=self.address,
            client=client,
            tokens=tokens,
            price=price,
            amount=tokens * price,
            input_commitment=fingerprints.commit_tensor(inputs),
            output_commitment=fingerprints.commit_tensor(outputs),
            fingerprint=fingerprints.fingerprint_hash(fingerprint),
            timestamp=int(time.time()),
        )
        return eip712.sign_receipt(receipt, self.private_key, self.domain), fingerprint


class CreditLedger:
    """Per-client balance at this node: charged by receipts, paid by the highest cumulative voucher received."""

    def __init__(self, *, node_address: str, credit_limit: int, domain: dict):
        self.node_address = node_address
        self.credit_limit = credit_limit
        self.domain = domain
        self._charged: dict[str, int] = defaultdict(int)
        self._paid: dict[tuple[str, str, int], int] = {}  # (client, partner, channel id) -> cumulative paid
        self._best_voucher: dict[tuple[str, str, int], schema.SignedVoucher] = {}
        self._lock = threading.Lock()

    def unpaid(self, client: str) -> int:
        paid = sum(v for (c, *_), v in self._paid.items() if c == client)
        return self._charged[client] - paid

    def check_credit(self, client: str, cost: int) -> None:
        if cost and self.unpaid(client) + cost > self.credit_limit:
            raise NodeRPCError(
                ErrorCode.CREDIT_LIMIT,
                f"client {client} owes {self.unpaid(client)} credit wei here and this step costs {cost}, above the "
                f"node's credit limit of {self.credit_limit}; send a voucher covering the receipts you received",
            )

    def charge(self, client: str, amount: int) -> None:
        with self._lock:
            self._charged[client] += amount

    def accept_voucher(self, data: dict, expected_client: str) -> schema.SignedVoucher | None:
        """Verifies a voucher from the wire; returns it if it raised the paid amount, raises on a bad one."""
        try:
            signed = schema.SignedVoucher.from_json(data)
            signer = eip712.recover_voucher_signer(signed, self.domain)
        except Exception as e:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"malformed voucher: {e}")
        voucher = signed.voucher
        if signer.lower() != voucher.client.lower() or voucher.client.lower() != expected_client.lower():
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "voucher signature does not match the session's client")
        if voucher.node.lower() != self.node_address.lower():
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"voucher is for node {voucher.node}, not {self.node_address}")
        key = (voucher.client, voucher.partner, voucher.channel_id)  # the partner is part of the channel
        with self._lock:
            if voucher.cumulative_amount <= self._paid.get(key, 0):
                return None  # stale or repeated: harmless, nothing new paid
            self._paid[key] = voucher.cumulative_amount
            self._best_voucher[key] = signed
        return signed

    def best_vouchers(self) -> list[schema.SignedVoucher]:
        with self._lock:
            return list(self._best_voucher.values())
