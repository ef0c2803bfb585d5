"""Signing proof-of-inference receipts and tracking what each client owes this node.

The node signs one receipt per step it computes; clients answer with cumulative vouchers. ``CreditLedger`` refuses
work once a client's unpaid amount would pass the node's credit limit, so a client that stops paying costs the node
at most that limit.

With a ledger (``backing`` set), a voucher counts as paid only as far as the chain backs it: what settled on the
client's channels to this node plus the client's reserve for this node (``nectar escrow reserve``), which no other
node can draw on and which cannot leave before the unlock delay (issue 20). Vouchers alone are promises: a client can
sign more than its escrow to several nodes, or withdraw before they settle. ``credit_limit`` stays the node's own
risk choice: the most a client may owe it beyond that backing (its unbacked allowance, also the lag between a
receipt and the voucher that pays it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as schema
from nectar.wire.protocol import ErrorCode, NodeRPCError

logger = logging.getLogger(__name__)


class ReceiptSigner:
    """Builds and signs receipts for one node and model. Thread-safe (stateless apart from its key)."""

    def __init__(
        self,
        *,
        private_key: str,
        model_id: str,
        price_per_token: int,
        domain: dict,
        compute: fingerprints.ComputeSpec | None = None,
    ):
        self.private_key = private_key
        self.address = eip712.address_of(private_key)
        self.model_id = model_id
        self.model_hash = schema.model_id_hash(model_id)
        self.price_per_token = price_per_token
        self.domain = domain
        # how this node computes (dtype, quantization, device class): every output-carrying receipt commits to it,
        # so an audit recomputes in the same precision and judges with that precision's tolerance
        self.compute = compute or fingerprints.ComputeSpec()
        self.descriptor = self.compute.encode()
        self.descriptor_hash = fingerprints.fingerprint_hash(self.descriptor)
        self.empty_hash = fingerprints.fingerprint_hash(b"")

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
        fingerprint = self.descriptor if outputs.ndim == 3 else b""
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
            fingerprint=self.descriptor_hash if fingerprint else self.empty_hash,
            timestamp=int(time.time()),
        )
        return eip712.sign_receipt(receipt, self.private_key, self.domain), fingerprint


class BackingCache:
    """What backs each client's vouchers to this node on chain (settled + reserve - pending release), asked of the
    ledger through ``fetch(client) -> int`` and kept ``ttl`` seconds. A fetch that fails keeps the last answer (0 for
    a client never seen): an unreachable ledger leaves clients their unbacked allowance, nothing more.

    ``get`` never blocks on a fresh entry; an expired one is refreshed in the background (a client's backing only
    shrinks through a release request, which takes the unlock delay: far longer than ``ttl``). ``refresh`` blocks
    (``fetch``'s own timeout) and is what a client short of credit waits for, at most once per ``min_interval``."""

    def __init__(self, fetch: Callable[[str], int], *, ttl: float = 10.0, min_interval: float = 0.5):
        self.fetch, self.ttl, self.min_interval = fetch, ttl, min_interval
        self._entries: dict[str, tuple[float, int]] = {}  # client -> (fetched at, backed wei)
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def get(self, client: str) -> int:
        with self._lock:
            at, value = self._entries.get(client, (None, 0))
            stale = at is None or time.monotonic() - at > self.ttl
            if stale and at is not None and client not in self._refreshing:
                self._refreshing.add(client)
                threading.Thread(target=self.refresh, args=(client,), name="backing-refresh", daemon=True).start()
        return value

    def refresh(self, client: str) -> int:
        with self._lock:
            at, value = self._entries.get(client, (None, 0))
            if at is not None and time.monotonic() - at < self.min_interval:
                self._refreshing.discard(client)
                return value
        try:
            value = int(self.fetch(client))
        except Exception as e:  # the ledger or chain down, or a malformed answer: keep what we knew
            logger.warning(f"Could not read the on-chain backing of client {client} from the ledger: {e}")
        with self._lock:
            self._entries[client] = (time.monotonic(), value)
            self._refreshing.discard(client)
        return value


class CreditLedger:
    """Per-client balance at this node: charged by receipts, paid by the highest cumulative voucher received, as far
    as the chain backs it when ``backing`` is given (see the module's docstring)."""

    def __init__(self, *, node_address: str, credit_limit: int, domain: dict, backing: BackingCache | None = None):
        self.node_address = node_address
        self.credit_limit = credit_limit
        self.domain = domain
        self.backing = backing
        self._charged: dict[str, int] = defaultdict(int)
        self._paid: dict[tuple[str, str, int], int] = {}  # (client, partner, channel id) -> cumulative paid
        self._best_voucher: dict[tuple[str, str, int], schema.SignedVoucher] = {}
        self._lock = threading.Lock()

    def vouched(self, client: str) -> int:
        return sum(v for (c, *_), v in self._paid.items() if c == client)

    def unpaid(self, client: str, *, backed: int | None = None) -> int:
        """What ``client`` owes beyond what counts as paid: its vouchers, capped by ``backed`` when given."""
        paid = self.vouched(client)
        if backed is not None:
            paid = min(paid, backed)
        return self._charged[client] - paid

    def check_credit(self, client: str, cost: int) -> None:
        if not cost:
            return
        if self.backing is None:
            if self.unpaid(client) + cost > self.credit_limit:
                raise NodeRPCError(
                    ErrorCode.CREDIT_LIMIT,
                    f"client {client} owes {self.unpaid(client)} credit wei here and this step costs {cost}, above "
                    f"the node's credit limit of {self.credit_limit}; send a voucher covering the receipts you "
                    f"received",
                )
            return
        backed = self.backing.get(client)
        if self.unpaid(client, backed=backed) + cost <= self.credit_limit:
            return
        backed = self.backing.refresh(client)  # short of credit: ask the chain (through the ledger) again
        unpaid = self.unpaid(client, backed=backed)
        if unpaid + cost <= self.credit_limit:
            return
        if self.unpaid(client) + cost > self.credit_limit:  # its vouchers lag: the usual case, not a backing one
            raise NodeRPCError(
                ErrorCode.CREDIT_LIMIT,
                f"client {client} owes {self.unpaid(client)} credit wei here and this step costs {cost}, above the "
                f"node's credit limit of {self.credit_limit}; send a voucher covering the receipts you received",
            )
        from nectar.wire.ledger_api import reserve_command  # httpx only for nodes with a ledger

        need = unpaid + cost - self.credit_limit
        raise NodeRPCError(
            ErrorCode.CREDIT_LIMIT,
            f"payment required: client {client}'s vouchers to node {self.node_address} are backed on chain for "
            f"{backed} credit wei (settled + its reserve for this node), at least {need} short of this step (the "
            f"node extends at most {self.credit_limit} unbacked); reserve escrow for this node, then retry: "
            f"{reserve_command(self.node_address)}",
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
