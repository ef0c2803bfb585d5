"""The fused Llama path rounds as transformers does, where audits compare the two.

Audits score a node's bfloat16/float16 outputs against a verifier that runs transformers' modules; a fused route that
rounds otherwise (more accurately or not) widens an honest node's scores past what the pooled test's threshold was
calibrated for (stop 33: RoPE as one multiply-add doubled the spread of honest log scores on a tiny Llama).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from nectar.models.families.llama.fused import rope_in_place, signed_sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_rounds_as_transformers_bit_for_bit(dtype):
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    rotary = LlamaRotaryEmbedding(config)
    generator = torch.Generator().manual_seed(0)
    n, heads, kv_heads, head_dim = 7, 4, 2, 64
    positions = torch.tensor([0, 1, 5, 63, 100, 250, 511])
    q = torch.randn(n, heads, head_dim, generator=generator).mul(4).to(dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=generator).mul(4).to(dtype)
    cos, sin = rotary(q, positions[None])  # [1, n, head_dim] in q's dtype, as the verifier's blocks take them
    # transformers' layout: [batch, heads, tokens, head_dim]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    qk = torch.cat([q, k], dim=1)  # the fused path's layout: [tokens, heads + kv_heads, head_dim]
    rope_in_place(qk, cos[0, :, None], signed_sin(sin[0, :, None]))
    assert torch.equal(qk[:, :heads], want_q[0].transpose(0, 1))
    assert torch.equal(qk[:, heads:], want_k[0].transpose(0, 1))
