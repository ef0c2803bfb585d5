"""``LedgerPaymentPolicy``: the node's payment hook that forwards receipts and vouchers to the ledger.

The node's step only appends to an in-memory queue; a background thread posts batches, retrying with backoff while
the ledger is down, and ``shutdown`` flushes what is left. Items the ledger rejects are logged, not retried.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import httpx

from nectar.ledger.client import LedgerClient, LedgerError
from nectar.node.payments import PaymentPolicy

logger = logging.getLogger(__name__)


class LedgerPaymentPolicy(PaymentPolicy):
    """Batches and posts receipts/vouchers from a background thread; never blocks the caller.

    :param ledger_url: base URL of ``nectar ledger``
    :param batch_size: items per POST
    :param flush_interval: seconds between posts when the queue is not full
    :param max_queue: receipts kept while the ledger is unreachable (oldest dropped past it, with a warning)
    """

    def __init__(self, ledger_url: str, *, batch_size: int = 500, flush_interval: float = 0.5,
                 max_queue: int = 1_000_000, client: LedgerClient | None = None):  # fmt: skip
        self.client = client or LedgerClient(ledger_url, timeout=10.0)
        self.batch_size, self.flush_interval, self.max_queue = batch_size, flush_interval, max_queue
        self._receipts: deque = deque()
        self._vouchers: dict[tuple, object] = {}  # latest voucher per channel only
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.sent_receipts = self.sent_vouchers = self.rejected = 0
        self._thread = threading.Thread(target=self._loop, name="ledger-policy", daemon=True)
        self._thread.start()

    def on_receipt(self, signed_receipt, fingerprint: bytes) -> None:
        with self._lock:
            if len(self._receipts) >= self.max_queue:
                self._receipts.popleft()
                logger.warning("Ledger unreachable for long: dropping the oldest queued receipt")
            self._receipts.append((signed_receipt, fingerprint))
            full = len(self._receipts) >= self.batch_size
        if full:
            self._wake.set()

    def on_voucher(self, signed_voucher) -> None:
        v = signed_voucher.voucher
        key = v.channel
        with self._lock:
            current = self._vouchers.get(key)
            if current is None or current.voucher.cumulative_amount < v.cumulative_amount:
                self._vouchers[key] = signed_voucher

    def pending(self) -> int:
        with self._lock:
            return len(self._receipts) + len(self._vouchers)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread after posting everything queued (gives up after ``timeout`` seconds)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self.pending():
            logger.warning(f"Ledger policy stopped with {self.pending()} items unsent (ledger unreachable)")
        self.client.close()

    def _loop(self) -> None:
        backoff = self.flush_interval
        deadline = None
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            if self._stopping.is_set() and deadline is None:
                deadline = time.monotonic() + 25.0
            try:
                while self._flush_once():
                    pass
                backoff = self.flush_interval
            except (httpx.HTTPError, LedgerError) as e:
                backoff = min(max(backoff * 2, 0.5), 30.0)
                logger.warning(f"Could not reach the ledger ({e}); retrying in {backoff:.1f}s")
            if self._stopping.is_set() and (not self.pending() or time.monotonic() > deadline):
                return
            if self._stopping.is_set():
                backoff = min(backoff, 1.0)

    def _flush_once(self) -> bool:
        """Post one batch of each kind; True if there may be more. Items stay queued until the ledger answered."""
        with self._lock:
            receipts = [self._receipts[i] for i in range(min(self.batch_size, len(self._receipts)))]
            vouchers = list(self._vouchers.items())[: self.batch_size]
        if vouchers:
            try:
                self._count(self.client.submit_vouchers([v for _, v in vouchers]), "voucher")
            except LedgerError as e:
                if e.status != 422:
                    raise
                logger.error(f"Ledger refused a malformed voucher batch, dropping it: {e.detail}")
            with self._lock:
                for key, voucher in vouchers:
                    if self._vouchers.get(key) is voucher:
                        del self._vouchers[key]
            self.sent_vouchers += len(vouchers)
        if receipts:
            try:
                result = self.client.submit_receipts(receipts)
            except LedgerError as e:
                if e.status != 422:
                    raise
                logger.error(f"Ledger refused a malformed receipt batch, dropping it: {e.detail}")
                result = None
            if result is not None:
                self._count(result, "receipt")
            with self._lock:
                for _ in receipts:
                    self._receipts.popleft()
            self.sent_receipts += len(receipts)
        return len(receipts) == self.batch_size

    def _count(self, result: dict, what: str) -> None:
        for item in result.get("results", []):
            if item["status"] == "rejected":
                self.rejected += 1
                logger.warning(f"Ledger rejected a {what}: {item['reason']}: {item['message']}")

