"""The receipts tree: sorted leaves, sorted pairs, odd nodes promoted; proofs verify, tampering fails."""

import os

import pytest
from eth_utils import keccak

from nectar.wire.merkle import EMPTY_ROOT, merkle_proof, merkle_root, verify_proof


def reference_root(leaves):
    level = sorted(leaves)
    while len(level) > 1:
        nxt = [keccak(min(a, b) + max(a, b)) for a, b in zip(level[::2], level[1::2])]
        level = nxt + ([level[-1]] if len(level) % 2 else [])
    return level[0]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 100])
def test_root_and_every_proof(n):
    leaves = [os.urandom(32) for _ in range(n)]
    root = merkle_root(leaves)
    assert root == reference_root(leaves) == merkle_root(list(reversed(leaves)))
    for i in range(n):
        proof = merkle_proof(leaves, i)
        assert verify_proof(root, leaves[i], proof)
        assert not verify_proof(root, os.urandom(32), proof)
        if proof:
            assert not verify_proof(root, leaves[i], proof[:-1] + [os.urandom(32)])


def test_empty_and_bad_leaves():
    assert merkle_root([]) == EMPTY_ROOT
    with pytest.raises(ValueError, match="32 bytes"):
        merkle_root([b"short"])
