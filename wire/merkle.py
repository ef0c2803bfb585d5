"""The epoch's receipts Merkle tree (docs/protocol.md), compatible with OpenZeppelin's ``MerkleProof``.

Leaves are sorted ascending before building; parents hash the sorted pair; an odd node is promoted unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nectar.wire.receipts import keccak256

logger = logging.getLogger(__name__)

EMPTY_ROOT = bytes(32)


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak256(a + b if a <= b else b + a)


def _check(leaves: Sequence[bytes]) -> list[bytes]:
    out = [bytes(leaf) for leaf in leaves]
    if any(len(leaf) != 32 for leaf in out):
        raise ValueError("every Merkle leaf must be 32 bytes")
    return sorted(out)


def _levels(sorted_leaves: list[bytes]) -> list[list[bytes]]:
    levels = [sorted_leaves]
    while len(levels[-1]) > 1:
        level = levels[-1]
        parents = [_hash_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            parents.append(level[-1])
        levels.append(parents)
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root over the leaves (any order: they are sorted first); the zero hash for an empty epoch."""
    ordered = _check(leaves)
    if not ordered:
        return EMPTY_ROOT
    return _levels(ordered)[-1][0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes from the leaf ``leaves[index]`` (index into the caller's list, not the sorted one) to the root."""
    leaf = bytes(leaves[index])
    ordered = _check(leaves)
    position = ordered.index(leaf)
    proof = []
    for level in _levels(ordered)[:-1]:
        sibling = position ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        position //= 2
    return proof


def verify_proof(root: bytes, leaf: bytes, proof: Sequence[bytes]) -> bool:
    node = bytes(leaf)
    for sibling in proof:
        node = _hash_pair(node, bytes(sibling))
    return node == bytes(root)


__all__ = ["merkle_root", "merkle_proof", "verify_proof", "EMPTY_ROOT"]
