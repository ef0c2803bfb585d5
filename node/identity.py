"""A node's identity on disk: its key folder (one libp2p key = the peer id, one Ethereum key = receipts), claimed for
the node's life so that two live nodes never announce the same peer id and address.

A node holds an exclusive ``flock`` on ``<key folder>/node.lock`` while it runs; the kernel drops it when the process
ends, however it ends. A node started without ``--name`` or ``--key-dir`` takes the first folder of
``~/.nectar/nodes/node``, ``node-2``, ``node-3``... that no live node holds, so a restarted single node gets its
identity back and a second node on the machine gets its own.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from hivemind.proto import crypto_pb2

logger = logging.getLogger(__name__)

LOCK_FILE = "node.lock"
MAX_AUTO_FOLDERS = 1000


class KeyDirInUse(ValueError):
    """Another live node holds this key folder (it would announce the same peer id and address)."""


@dataclass
class ClaimedKeyDir:
    """A key folder this process holds; ``release()`` (or the end of the process) frees it."""

    path: Path
    name: str
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _try_lock(folder: Path) -> int | None:
    """A descriptor holding the folder's lock, or None if a live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _holder(folder: Path) -> str:
    try:
        pid = (folder / LOCK_FILE).read_text().strip()
    except OSError:
        return "another node"
    return f"the node with process id {pid}" if pid else "another node"


def claim_key_dir(folder: str | Path, *, name: str) -> ClaimedKeyDir:
    """Holds ``folder`` for this node; ``KeyDirInUse`` if a live node already holds it."""
    folder = Path(folder)
    fd = _try_lock(folder)
    if fd is None:
        raise KeyDirInUse(
            f"the key folder {folder} is in use by {_holder(folder)}: two nodes with one key folder "
            "would announce the same peer id and Ethereum address. Give this node its own --key-dir "
            "or --name (or leave both out to get a free identity)"
        )
    return ClaimedKeyDir(folder, name, fd)


def claim_free_key_dir(nodes_dir: str | Path, base: str = "node") -> ClaimedKeyDir:
    """Holds the first of ``nodes_dir/base``, ``base-2``, ``base-3``... that no live node holds."""
    nodes_dir = Path(nodes_dir)
    for n in range(1, MAX_AUTO_FOLDERS + 1):
        name = base if n == 1 else f"{base}-{n}"
        fd = _try_lock(nodes_dir / name)
        if fd is not None:
            if n > 1:
                logger.info(f"{nodes_dir / base} is held by a live node: this node is {name!r}")
            return ClaimedKeyDir(nodes_dir / name, name, fd)
    raise KeyDirInUse(f"{MAX_AUTO_FOLDERS} live nodes already hold the key folders under {nodes_dir}: pass --key-dir")


# ---------------------------------------------------------------------------------------------------- keys
def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_or_create_p2p_identity(path: Path) -> Ed25519PrivateKey:
    """Reads (or creates) a libp2p private key file in the protobuf format that hivemind's P2P daemon accepts."""
    path = Path(path)
    if path.exists():
        message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        if message.key_type != crypto_pb2.KeyType.Ed25519:
            raise ValueError(f"{path} holds a non-Ed25519 libp2p key; delete it to let Nectar create a new one")
        return Ed25519PrivateKey.from_private_bytes(message.data[:32])
    private_key = Ed25519PrivateKey.generate()
    seed = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    message = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=seed + public)
    _write_private(path, message.SerializeToString())
    logger.info(f"Created a new P2P identity at {path}")
    return private_key


def load_or_create_eth_key(path: Path) -> str:
    """The node's Ethereum private key (hex), used to sign receipts; created on first start."""
    from eth_account import Account

    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())["private_key"]
    account = Account.create()
    _write_private(path, json.dumps({"address": account.address, "private_key": account.key.hex()}).encode())
    logger.info(f"Created a new Ethereum key for this node at {path} (address {account.address})")
    return account.key.hex()
