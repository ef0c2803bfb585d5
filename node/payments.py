"""Payment hooks of a node: where signed receipts go and who may be served on credit.

The node signs a receipt for every step it computes (``nectar.wire.receipts``) and receives cumulative vouchers from
clients. What happens to them is a policy: ``NoPaymentPolicy`` keeps nothing (a free swarm),
``nectar.wire.ledger_api.LedgerPaymentPolicy`` forwards them to the ledger service (``Server(payments=...)``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

logger = logging.getLogger(__name__)


class CreditLimitExceeded(Exception):
    """The client's unpaid work at this node is above the node's credit limit; it must send a voucher first."""


class PaymentPolicy(ABC):
    """Called by the node's handler; implementations must be thread-safe and must never block a step for long."""

    @abstractmethod
    def on_receipt(self, signed_receipt, fingerprint: bytes) -> None:
        """A receipt the node just signed (``nectar.wire.receipts.SignedReceipt``) with its fingerprint bytes."""

    @abstractmethod
    def on_voucher(self, signed_voucher) -> None:
        """A voucher (``nectar.wire.receipts.SignedVoucher``) the node accepted from a client (already verified)."""

    def shutdown(self) -> None:
        """Flush what is pending; called once when the node stops."""


class NoPaymentPolicy(PaymentPolicy):
    """Default: receipts and vouchers stay in the node's memory only (credit tracking still applies)."""

    def on_receipt(self, signed_receipt, fingerprint: bytes) -> None:
        pass

    def on_voucher(self, signed_voucher) -> None:
        pass
