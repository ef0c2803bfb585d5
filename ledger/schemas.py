"""Request and response bodies of the ledger's HTTP API (pydantic)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)


class ReceiptBatch(BaseModel):
    """``receipts``: items ``{"receipt": {...}, "signature": "0x..", "fingerprintBytes": "0x..",
    "clientSignature": "0x.." (a client's countersignature; with it, fingerprintBytes may be null)}``."""

    receipts: list[dict[str, Any]] = Field(min_length=1)


class VoucherBatch(BaseModel):
    vouchers: list[dict[str, Any]] = Field(min_length=1)


class ItemResult(BaseModel):
    index: int
    status: str  # accepted / duplicate / rejected
    reason: str | None = None
    message: str = ""
    leaf: str | None = None


class BatchResult(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[ItemResult]


class ReportIn(BaseModel):
    """A client's measurement of a node, signed (EIP-191) by the client over
    ``nectar.wire.ledger_api.report_message(...)``."""

    node: str
    reporter: str
    nonce: int = Field(ge=1, lt=2**64)  # above every nonce accepted from this reporter about this node
    online: bool | None = None
    success: bool | None = None
    latency_ms: float | None = Field(default=None, ge=0)
    throughput: float | None = Field(default=None, ge=0)
    timestamp: int
    signature: str


class EpochPublic(BaseModel):
    number: int
    status: str
    receipt_count: int
    total_amount: str
    root: str | None
    root_tx_hash: str | None
    closed_at: str | None
    settled_at: str | None
    last_error: str | None = None
