"""The LoRA adapters the ledger fetched from audited nodes (issue 21): a step computed with an adapter is recomputed
with the very files its receipt's digest binds, obtained from the node that signed it.

Files reach the ledger from a node, so they are hostile until checked: the sha256 of config and weights must be the
receipt's digest (``nectar.models.adapters.adapter_digest``), each adapter is bounded in bytes, and the folder keeps
at most ``max_adapters`` of them (the least recently used goes first).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_FETCHED_ADAPTER_BYTES = 256 * 1024**2  # a LoRA of a 7B model at rank 64 is ~160 MiB; a larger answer is refused
MAX_FETCHED_ADAPTERS = 16
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # as nectar.models.adapters names them
MAX_CONFIG_BYTES = 1024**2


class AdapterRejected(ValueError):
    """A node's adapter files are not the adapter its receipt names (another digest) or are over the ledger's cap."""


class AdapterStore:
    """Fetched adapter folders, one per digest, in a ledger-owned folder (a fresh temporary one by default).

    :param folder: where the folders are kept (created; each adapter is ``<folder>/<digest hex>``)
    :param max_bytes: the most bytes (config and weights together) one adapter may have
    :param max_adapters: how many are kept; the least recently used is deleted past it
    """

    def __init__(
        self,
        folder: str | os.PathLike | None = None,
        *,
        max_bytes: int = MAX_FETCHED_ADAPTER_BYTES,
        max_adapters: int = MAX_FETCHED_ADAPTERS,
    ):
        self._folder = Path(folder) if folder is not None else None
        self.max_bytes, self.max_adapters = max_bytes, max_adapters
        self._held: OrderedDict[bytes, Path] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        """Created on first use (a checking run that meets no adapter step leaves nothing behind)."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="nectar-ledger-adapters-"))
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def get(self, digest: bytes) -> Path | None:
        """The folder of a stored adapter (now the most recently used), or None."""
        with self._lock:
            path = self._held.get(bytes(digest))
            if path is None or not path.is_dir():
                self._held.pop(bytes(digest), None)
                return None
            self._held.move_to_end(bytes(digest))
            return path

    def check(self, digest: bytes, config: bytes, weights: bytes) -> None:
        """Raises ``AdapterRejected`` unless these files are the adapter of ``digest`` and within the caps."""
        size = len(config) + len(weights)
        if size > self.max_bytes:
            raise AdapterRejected(
                f"adapter files of {size} bytes; the ledger audits adapters of at most {self.max_bytes}"
            )
        if len(config) > MAX_CONFIG_BYTES:
            raise AdapterRejected(f"an adapter config of {len(config)} bytes (at most {MAX_CONFIG_BYTES})")
        hasher = hashlib.sha256(config)  # adapter_digest: config, then weights, in one hash
        hasher.update(weights)
        got = hasher.digest()
        if got != bytes(digest):
            raise AdapterRejected(
                f"files that hash to 0x{got.hex()[:16]}...; the receipt was computed with adapter "
                f"0x{bytes(digest).hex()[:16]}..."
            )

    def admit(self, digest: bytes, config: bytes, weights: bytes) -> Path:
        """Checks the files (``check``) and keeps them; returns the adapter's folder."""
        self.check(digest, config, weights)
        digest = bytes(digest)
        final = self.folder / digest.hex()
        with self._lock:
            if final.is_dir():
                self._held[digest] = final
                self._held.move_to_end(digest)
                return final
            staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.folder))
            try:
                (staging / CONFIG_FILE).write_bytes(config)
                (staging / WEIGHTS_FILE).write_bytes(weights)
                os.replace(staging, final)  # whole or absent: a crash never leaves a half-written adapter
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._held[digest] = final
            while len(self._held) > self.max_adapters:
                _, oldest = self._held.popitem(last=False)
                shutil.rmtree(oldest, ignore_errors=True)  # a verifier that held it asks again (``holds_adapter``)
            return final


__all__ = ["AdapterRejected", "AdapterStore", "MAX_FETCHED_ADAPTER_BYTES", "MAX_FETCHED_ADAPTERS"]
