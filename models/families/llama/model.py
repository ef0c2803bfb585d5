"""The Llama family: Llama-architecture decoders with grouped-query attention. Its class is also the base of the
families whose blocks are Llama-shaped (mistral, qwen2, qwen3, mixtral), each in its own subpackage."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from nectar.models.families.llama.batching import LlamaBatchRunner
from nectar.models.families.llama.block import LlamaRunner, cache_keyword
from nectar.models.families.llama.config import BLOCK_PREFIXES, HEAD_SOURCES, LlamaVariant, variant_for
from nectar.models.family import BlockRunner, HeadModules, KVLayout, ModelFamily
from nectar.models.fast_path import BatchRunner

logger = logging.getLogger(__name__)


class LlamaFamily(ModelFamily):
    """LlamaDecoderLayer blocks with RoPE; embeddings, RMSNorm and LM head on the client.

    A Llama-shaped family subclasses it and sets ``name``, ``model_types`` and ``class_prefix`` (its transformers
    classes are ``<class_prefix>DecoderLayer``, ``...RotaryEmbedding``, ``...RMSNorm``), and ``sliding_window`` if
    its attention has one."""

    name = "llama"
    model_types = ("llama",)
    class_prefix: ClassVar[str] = "Llama"

    def variant(self, config: PretrainedConfig) -> LlamaVariant:
        return variant_for(config.model_type, self.class_prefix)

    def sliding_window(self, config: PretrainedConfig) -> int | None:
        """Attention window in tokens of every block, or None (Llama has none)."""
        return None

    def prepare_config(self, config: PretrainedConfig) -> None:
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"  # what transformers picks for these models by default

    def block_prefixes(self, index: int) -> tuple[str, ...]:
        return tuple(prefix.format(index=index) for prefix in BLOCK_PREFIXES)

    def build_block(self, config: PretrainedConfig, local_index: int) -> nn.Module:
        return self.variant(config).decoder_layer(config, layer_idx=local_index)

    def kv_layout(self, config: PretrainedConfig) -> KVLayout:
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return KVLayout(num_heads=getattr(config, "num_key_value_heads", None) or num_heads, head_dim=head_dim)

    def make_runner(self, config: PretrainedConfig) -> BlockRunner:
        variant = self.variant(config)
        return LlamaRunner(
            config,
            rotary=variant.rotary_embedding(config=config),
            cache_kwarg=cache_keyword(variant.decoder_layer),
            sliding_window=self.sliding_window(config),
        )

    def build_head(self, config: PretrainedConfig) -> HeadModules:
        return HeadModules(
            word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            embed_norm=None,
            final_norm=self.variant(config).rms_norm(config.hidden_size, eps=config.rms_norm_eps),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
            sources=dict(HEAD_SOURCES),
        )

    def batch_runner(self, spans: Sequence[nn.Module]) -> BatchRunner | None:
        """Fused, batched steps (``batching.py``) unless the blocks hold what its kernels do not compute."""
        return LlamaBatchRunner(spans) if LlamaBatchRunner.unsupported(spans) is None else None

    def generic_path_reason(self, spans: Sequence[nn.Module]) -> str:
        return LlamaBatchRunner.unsupported(spans) or super().generic_path_reason(spans)
