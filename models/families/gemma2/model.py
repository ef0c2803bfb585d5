"""The Gemma 2 family: Gemma2DecoderLayer (soft-capped attention, alternating local/global layers); the client
scales the embeddings by sqrt(hidden_size) and soft-caps the final logits."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from transformers import PretrainedConfig
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2RMSNorm

from nectar.models.families.gemma2.block import Gemma2Runner
from nectar.models.families.gemma2.config import BLOCK_PREFIXES, HEAD_SOURCES
from nectar.models.family import BlockRunner, HeadModules, KVLayout, ModelFamily

logger = logging.getLogger(__name__)


class Gemma2Family(ModelFamily):
    """Gemma2DecoderLayer blocks with RoPE; scaled embeddings, (1 + weight) RMSNorm and the tied, soft-capped LM head
    on the client."""

    name = "gemma2"
    model_types = ("gemma2",)

    def prepare_config(self, config: PretrainedConfig) -> None:
        if config._attn_implementation is None:
            config._attn_implementation = "eager"  # transformers' choice too: SDPA cannot soft-cap

    def block_prefixes(self, index: int) -> tuple[str, ...]:
        return tuple(prefix.format(index=index) for prefix in BLOCK_PREFIXES)

    def build_block(self, config: PretrainedConfig, local_index: int) -> nn.Module:
        return self.build_block_at(config, local_index, local_index)  # right for spans from block 0 only

    def build_block_at(self, config: PretrainedConfig, index: int, local_index: int) -> nn.Module:
        # the layer reads its type (sliding or global) from config.layer_types[layer_idx], but caches at local_index
        block = Gemma2DecoderLayer(config, layer_idx=index)
        block.self_attn.layer_idx = local_index
        return block

    def kv_layout(self, config: PretrainedConfig) -> KVLayout:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return KVLayout(num_heads=config.num_key_value_heads, head_dim=head_dim)

    def generic_path_reason(self, spans: Sequence[nn.Module]) -> str:
        return "attention soft-capping and alternating sliding windows are not in the fused kernels"

    def make_runner(self, config: PretrainedConfig) -> BlockRunner:
        return Gemma2Runner(config)

    def build_head(self, config: PretrainedConfig) -> HeadModules:
        return HeadModules(
            word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            embed_norm=None,
            final_norm=Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
            sources=dict(HEAD_SOURCES),
            embed_scale=config.hidden_size**0.5,
            logit_softcap=getattr(config, "final_logit_softcapping", None),
        )
