"""Peer ids of Ed25519 libp2p keys (a node's keys on disk live in ``nectar.node.identity``).

Because an Ed25519 peer id embeds its public key, anyone can check that a DHT record was signed by the peer it
names: this is what makes announcements unforgeable (see ``nectar.wire.announce``).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hivemind.p2p import PeerID

ED25519_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"  # identity multihash, len 36, PublicKey{type=Ed25519, 32 bytes}


def _raw_public(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def peer_id_of(private_key: Ed25519PrivateKey) -> PeerID:
    return PeerID(ED25519_PEER_ID_PREFIX + _raw_public(private_key))


def public_key_of_peer(peer_id: PeerID | bytes) -> Ed25519PublicKey | None:
    """The Ed25519 key embedded in a peer id, or None for peer ids that do not embed one (e.g. RSA)."""
    raw = peer_id.to_bytes() if isinstance(peer_id, PeerID) else bytes(peer_id)
    if len(raw) != len(ED25519_PEER_ID_PREFIX) + 32 or not raw.startswith(ED25519_PEER_ID_PREFIX):
        return None
    return Ed25519PublicKey.from_public_bytes(raw[len(ED25519_PEER_ID_PREFIX) :])
