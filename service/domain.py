"""The EIP-712 domain of a deployment file (the ledger verifies against it, the gateway signs under it), re-read when
the file changes (a devnet restart)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from nectar.deployment import domain_from_deployment

logger = logging.getLogger(__name__)


class DomainProvider:
    """Thread-safe cached domain keyed on the deployment file's modification time."""

    def __init__(self, path: Path):
        self.path, self._lock, self._cached = Path(path), threading.Lock(), (None, None)

    def get(self) -> dict:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if self._cached[0] != stamp or self._cached[1] is None:
                self._cached = (stamp, domain_from_deployment(self.path, strict=True))
                logger.info(f"Verifying against EIP-712 domain {self._cached[1]}")
            return self._cached[1]
