"""The Llama family: Llama-architecture decoders with grouped-query attention (llama, mistral)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from transformers import PretrainedConfig

from nectar.models.families.llama.batching import LlamaBatchRunner
from nectar.models.families.llama.block import LlamaRunner, cache_keyword
from nectar.models.families.llama.config import (
    BLOCK_PREFIXES,
    HEAD_SOURCES,
    SLIDING_WINDOW_TYPES,
    VARIANT_PREFIXES,
    variant_for,
)
from nectar.models.family import BlockRunner, HeadModules, KVLayout, ModelFamily
from nectar.models.fast_path import BatchRunner

logger = logging.getLogger(__name__)


class LlamaFamily(ModelFamily):
    """LlamaDecoderLayer / MistralDecoderLayer blocks with RoPE; embeddings, RMSNorm and LM head on the client."""

    name = "llama"
    model_types = tuple(VARIANT_PREFIXES)

    def prepare_config(self, config: PretrainedConfig) -> None:
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"  # what transformers picks for these models by default

    def block_prefixes(self, index: int) -> tuple[str, ...]:
        return tuple(prefix.format(index=index) for prefix in BLOCK_PREFIXES)

    def build_block(self, config: PretrainedConfig, local_index: int) -> nn.Module:
        return variant_for(config.model_type).decoder_layer(config, layer_idx=local_index)

    def kv_layout(self, config: PretrainedConfig) -> KVLayout:
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return KVLayout(num_heads=getattr(config, "num_key_value_heads", None) or num_heads, head_dim=head_dim)

    def make_runner(self, config: PretrainedConfig) -> BlockRunner:
        variant = variant_for(config.model_type)
        window = getattr(config, "sliding_window", None) if config.model_type in SLIDING_WINDOW_TYPES else None
        return LlamaRunner(
            config,
            rotary=variant.rotary_embedding(config=config),
            cache_kwarg=cache_keyword(variant.decoder_layer),
            sliding_window=window,
        )

    def build_head(self, config: PretrainedConfig) -> HeadModules:
        variant = variant_for(config.model_type)
        return HeadModules(
            word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            embed_norm=None,
            final_norm=variant.rms_norm(config.hidden_size, eps=config.rms_norm_eps),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
            sources=dict(HEAD_SOURCES),
        )

    def batch_runner(self, spans: Sequence[nn.Module]) -> BatchRunner | None:
        """Fused, batched steps (``batching.py``) unless a block has a sliding window or is not a standard layer."""
        return LlamaBatchRunner(spans) if LlamaBatchRunner.supports(spans) else None
