"""Node identities: one Ed25519 libp2p key (the peer id) and one Ethereum key (receipts), created on first start.

Because an Ed25519 peer id embeds its public key, anyone can check that a DHT record was signed by the peer it
names: this is what makes announcements unforgeable (see ``nectar.wire.announce``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

logger = logging.getLogger(__name__)

ED25519_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"  # identity multihash, len 36, PublicKey{type=Ed25519, 32 bytes}


def _raw_public(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


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
    message = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=seed + _raw_public(private_key))
    _write_private(path, message.SerializeToString())
    logger.info(f"Created a new P2P identity at {path}")
    return private_key


def peer_id_of(private_key: Ed25519PrivateKey) -> PeerID:
    return PeerID(ED25519_PEER_ID_PREFIX + _raw_public(private_key))


def public_key_of_peer(peer_id: PeerID | bytes) -> Ed25519PublicKey | None:
    """The Ed25519 key embedded in a peer id, or None for peer ids that do not embed one (e.g. RSA)."""
    raw = peer_id.to_bytes() if isinstance(peer_id, PeerID) else bytes(peer_id)
    if len(raw) != len(ED25519_PEER_ID_PREFIX) + 32 or not raw.startswith(ED25519_PEER_ID_PREFIX):
        return None
    return Ed25519PublicKey.from_public_bytes(raw[len(ED25519_PEER_ID_PREFIX) :])


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
