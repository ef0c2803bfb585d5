"""Which transformers classes serve a Llama-architecture ``model_type``, and where their tensors live."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

BLOCK_PREFIXES = ("model.layers.{index}.", "layers.{index}.")  # CausalLM checkpoints, then bare-model ones
HEAD_SOURCES = {
    "word_embeddings.weight": ("model.embed_tokens.weight", "embed_tokens.weight"),
    "final_norm.weight": ("model.norm.weight", "norm.weight"),
    "lm_head.weight": ("lm_head.weight",),
}


@dataclass(frozen=True)
class LlamaVariant:
    """The decoder layer, rotary embedding and RMSNorm classes of one model_type."""

    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    rms_norm: type[nn.Module]


def variant_for(model_type: str, prefix: str) -> LlamaVariant:
    """The classes ``<prefix>DecoderLayer`` ... of ``transformers.models.<model_type>.modeling_<model_type>``."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return LlamaVariant(
        decoder_layer=getattr(module, f"{prefix}DecoderLayer"),
        rotary_embedding=getattr(module, f"{prefix}RotaryEmbedding"),
        rms_norm=getattr(module, f"{prefix}RMSNorm"),
    )
