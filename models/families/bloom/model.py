"""The BLOOM family: BloomBlock with ALiBi; the client also applies BLOOM's word-embedding LayerNorm."""

from __future__ import annotations

import logging

from torch import nn
from transformers import PretrainedConfig
from transformers.models.bloom.modeling_bloom import BloomBlock

from nectar.models.families.bloom.block import BloomRunner
from nectar.models.families.bloom.config import BLOCK_PREFIXES, HEAD_SOURCES
from nectar.models.family import BlockRunner, HeadModules, KVLayout, ModelFamily

logger = logging.getLogger(__name__)


class BloomFamily(ModelFamily):
    """BloomBlock blocks; embeddings (+ their LayerNorm), ``ln_f`` and the tied LM head on the client."""

    name = "bloom"
    model_types = ("bloom",)

    def prepare_config(self, config: PretrainedConfig) -> None:
        if config._attn_implementation is None:
            config._attn_implementation = "eager"  # BloomAttention is eager-only

    def block_prefixes(self, index: int) -> tuple[str, ...]:
        return tuple(prefix.format(index=index) for prefix in BLOCK_PREFIXES)

    def build_block(self, config: PretrainedConfig, local_index: int) -> nn.Module:
        return BloomBlock(config, layer_idx=local_index)

    def kv_layout(self, config: PretrainedConfig) -> KVLayout:
        return KVLayout(num_heads=config.n_head, head_dim=config.hidden_size // config.n_head)

    def make_runner(self, config: PretrainedConfig) -> BlockRunner:
        return BloomRunner(config)

    def build_head(self, config: PretrainedConfig) -> HeadModules:
        return HeadModules(
            word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            embed_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            final_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
            sources=dict(HEAD_SOURCES),
        )
