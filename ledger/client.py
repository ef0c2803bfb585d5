"""``LedgerClient``: the ledger's HTTP API for nodes (submissions), the API gateway and the client's routing."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct

from nectar.wire.receipts import SignedReceipt, SignedVoucher

logger = logging.getLogger(__name__)


class LedgerError(Exception):
    """The ledger answered with an error status; the message carries its explanation."""

    def __init__(self, status: int, detail):
        super().__init__(f"ledger answered {status}: {detail}")
        self.status, self.detail = status, detail


class LedgerClient:
    """Thin synchronous client. Thread-safe (one httpx.Client).

    :param base_url: e.g. ``http://127.0.0.1:8700``
    :param timeout: seconds per request
    :param admin_token: only for ``close_epoch``
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0, admin_token: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> dict | list:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise LedgerError(response.status_code, detail)
        return response.json()

    def submit_receipts(self, items: Sequence[tuple[SignedReceipt, bytes]]) -> dict:
        """Post (signed receipt, fingerprint bytes) pairs; returns per-item verdicts."""
        body = [{**signed.to_json(), "fingerprintBytes": "0x" + bytes(fp).hex()} for signed, fp in items]
        return self._request("POST", "/v1/receipts", json={"receipts": body})

    def submit_vouchers(self, vouchers: Sequence[SignedVoucher]) -> dict:
        return self._request("POST", "/v1/vouchers", json={"vouchers": [v.to_json() for v in vouchers]})

    def reputation(self) -> list[dict]:
        return self._request("GET", "/v1/reputation")["nodes"]

    def node(self, address: str) -> dict:
        return self._request("GET", f"/v1/nodes/{address}")

    def epochs(self) -> list[dict]:
        return self._request("GET", "/v1/epochs")

    def config(self) -> dict:
        return self._request("GET", "/v1/config")

    def health(self) -> dict:
        return self._request("GET", "/health")

    def close_epoch(self, *, allow_empty: bool = False) -> dict:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        return self._request("POST", "/v1/epochs/close", params={"allow_empty": allow_empty}, headers=headers)

    def report(self, *, private_key, node: str, online: bool | None = None, success: bool | None = None,
               latency_ms: float | None = None, throughput: float | None = None) -> dict:  # fmt: skip
        """Report a measurement of ``node`` as the client owning ``private_key`` (must have paid that node)."""
        from nectar.ledger.schemas import report_message

        body = {"node": node, "reporter": Account.from_key(private_key).address, "online": online, "success": success,
                "latency_ms": latency_ms, "throughput": throughput, "timestamp": int(time.time())}  # fmt: skip
        signature = Account.sign_message(encode_defunct(text=report_message(body)), private_key).signature
        return self._request("POST", "/v1/reports", json={**body, "signature": "0x" + bytes(signature).hex()})
