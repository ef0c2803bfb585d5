"""The Falcon family: FalconDecoderLayer in all its variants (7B-style multi-query with parallel attention,
40B/180B-style grouped KV heads, RoPE or ALiBi); embeddings, ``ln_f`` and the tied LM head on the client."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from transformers import PretrainedConfig
from transformers.models.falcon.modeling_falcon import FalconDecoderLayer

from nectar.models.families.falcon.block import FalconRunner
from nectar.models.families.falcon.config import BLOCK_PREFIXES, HEAD_SOURCES
from nectar.models.family import BlockRunner, HeadModules, KVLayout, ModelFamily

logger = logging.getLogger(__name__)


class FalconFamily(ModelFamily):
    """FalconDecoderLayer blocks; ``word_embeddings``, ``ln_f`` (LayerNorm) and the LM head on the client."""

    name = "falcon"
    model_types = ("falcon",)

    def prepare_config(self, config: PretrainedConfig) -> None:
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"  # what transformers picks for Falcon

    def block_prefixes(self, index: int) -> tuple[str, ...]:
        return tuple(prefix.format(index=index) for prefix in BLOCK_PREFIXES)

    def build_block(self, config: PretrainedConfig, local_index: int) -> nn.Module:
        return FalconDecoderLayer(config, layer_idx=local_index)

    def kv_layout(self, config: PretrainedConfig) -> KVLayout:
        # what FalconAttention caches: grouped KV heads (new architecture), one (multi-query) or one per query head
        if config.new_decoder_architecture:
            num_heads = config.num_kv_heads
        elif config.multi_query:
            num_heads = 1
        else:
            num_heads = config.num_attention_heads
        return KVLayout(num_heads=num_heads, head_dim=config.hidden_size // config.num_attention_heads)

    def generic_path_reason(self, spans: Sequence[nn.Module]) -> str:
        return "the fused kernels compute Llama's layer, not Falcon's fused QKV and parallel attention"

    def make_runner(self, config: PretrainedConfig) -> BlockRunner:
        return FalconRunner(config)

    def build_head(self, config: PretrainedConfig) -> HeadModules:
        return HeadModules(
            word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            embed_norm=None,
            final_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
            sources=dict(HEAD_SOURCES),
        )
