"""Tiny random checkpoints for the batching and scheduler tests (built once per session, no hub)."""

from __future__ import annotations

import pytest

from nectar.models.tiny import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """4 blocks, hidden 64, 4 query / 2 key-value heads (GQA)."""
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("speed") / "tiny-llama", "llama", seed=0))


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> str:
    """A sliding window of 6 tokens: the batched path must hand it to the generic one."""
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("speed") / "tiny-mistral", "mistral", seed=2))
