"""The contract one model family fulfils: where its tensors live, how to build and run its blocks."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from nectar.models.attention import AttentionStep
from nectar.models.checkpoint import Checkpoint
from nectar.models.errors import CheckpointError
from nectar.models.fast_path import BatchRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVLayout:
    """Shape of one block's keys/values: ``[batch, num_heads, length, head_dim]``."""

    num_heads: int
    head_dim: int


@dataclass
class HeadModules:
    """The client-side modules, built on the meta device and filled from the checkpoint by ``load_client_head``.

    ``sources`` maps each state-dict key of these modules (``word_embeddings.weight``, ``final_norm.bias``, ...)
    to the checkpoint keys that may hold it, tried in order.
    """

    word_embeddings: nn.Embedding
    embed_norm: nn.Module | None
    final_norm: nn.Module
    lm_head: nn.Linear
    sources: dict[str, tuple[str, ...]]
    embed_scale: float | None = None  # embeddings are multiplied by it (Gemma: sqrt(hidden_size))
    logit_softcap: float | None = None  # logits become cap * tanh(logits / cap) (Gemma 2)


class BlockRunner(nn.Module, ABC):
    """Runs a family's transformers blocks for one step; holds the per-span state they share (e.g. rotary tables).

    Called by ``BlockSpan.forward``: ``step_inputs`` once per forward, then ``run_block`` once per block.
    """

    @abstractmethod
    def step_inputs(self, hidden_states: torch.Tensor, step: AttentionStep) -> dict[str, Any]:
        """Per-step tensors every block needs (position embeddings / alibi, the attention mask)."""

    @abstractmethod
    def run_block(
        self, block: nn.Module, hidden_states: torch.Tensor, inputs: dict[str, Any], cache: Any
    ) -> torch.Tensor:
        """One block's forward; ``cache`` is a transformers-style object with ``update(k, v, layer_idx)`` or None."""


class ModelFamily(ABC):
    """One architecture family (Llama-like, BLOOM, ...). Subclasses register themselves in ``nectar.models.registry``.

    Everything architecture-specific lives here, so the span, head and cache code stays generic.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this family serves

    def prepare_config(self, config: PretrainedConfig) -> None:
        """Fill in what a bare config lacks to run standalone blocks (default: nothing)."""

    def num_blocks(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    @abstractmethod
    def block_prefixes(self, index: int) -> tuple[str, ...]:
        """Checkpoint key prefixes that may hold block ``index`` (tried in order, e.g. with/without a base prefix)."""

    @abstractmethod
    def build_block(self, config: PretrainedConfig, local_index: int) -> nn.Module:
        """A transformers decoder layer whose ``layer_idx`` is its index inside the span."""

    def build_block_at(self, config: PretrainedConfig, index: int, local_index: int) -> nn.Module:
        """Block ``index`` of the model, ``local_index``-th of its span. Families whose blocks differ by position
        (alternating local/global attention) override this; default: ``build_block``."""
        return self.build_block(config, local_index)

    @abstractmethod
    def kv_layout(self, config: PretrainedConfig) -> KVLayout:
        """What one block stores per token in the KV cache."""

    @abstractmethod
    def make_runner(self, config: PretrainedConfig) -> BlockRunner:
        """The module that feeds steps through this family's blocks."""

    @abstractmethod
    def build_head(self, config: PretrainedConfig) -> HeadModules:
        """Embeddings, final norm and LM head (with their checkpoint key candidates) for the client."""

    def batch_runner(self, spans: Sequence[nn.Module]) -> BatchRunner | None:
        """This family's fast path for a node's inference steps through ``spans`` (one single-block ``BlockSpan``
        per block, in order), or None: the node runs steps through ``BlockSpan.forward``, one session at a time.
        Called once at load; may time its routes then. Default: None."""
        return None

    def generic_path_reason(self, spans: Sequence[nn.Module]) -> str:
        """Why ``batch_runner`` gives ``spans`` no fast path, for the node's log."""
        return f"the {self.name} blocks have no fast path"

    def load_block_tensors(
        self, checkpoint: Checkpoint, prefix: str, names: list[str], *, dtype: torch.dtype, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """A block's state-dict tensors ``names`` from the checkpoint's keys under ``prefix``. Default: stored under
        the same names; a family whose checkpoints store them otherwise (e.g. one matrix per expert) converts here."""
        missing = [name for name in names if prefix + name not in checkpoint]
        if missing:
            raise CheckpointError(f"{checkpoint.path} lacks tensors of a block: {[prefix + m for m in missing]}")
        tensors = checkpoint.load([prefix + name for name in names], dtype=dtype, device=device)
        return {name: tensors[prefix + name] for name in names}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model_types={self.model_types!r})"
