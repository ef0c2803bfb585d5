"""Runs transformers' FalconDecoderLayer over a span: RoPE at absolute positions, or ALiBi folded into the mask."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.falcon.modeling_falcon import FalconRotaryEmbedding, build_alibi_tensor

from nectar.models.attention import AttentionStep
from nectar.models.family import BlockRunner

logger = logging.getLogger(__name__)


class FalconRunner(BlockRunner):
    """Builds one step's rotary tables, or its ALiBi bias, once and feeds them to every block.

    :param config: the Falcon config
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.alibi = bool(config.alibi)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = None if self.alibi else FalconRotaryEmbedding(config=config)

    def step_inputs(self, hidden_states: torch.Tensor, step: AttentionStep) -> dict[str, Any]:
        dtype, device = hidden_states.dtype, hidden_states.device
        position_ids = step.position_ids(device)
        mask = step.causal_mask(dtype=dtype, device=device) if step.query_length > 1 or self.alibi else None
        if self.alibi:  # as FalconModel does: the scaled bias where a key is visible, dtype-min elsewhere
            batch_size = hidden_states.shape[0]
            keys_present = torch.ones(batch_size, step.key_length, dtype=torch.long, device=device)
            alibi = build_alibi_tensor(keys_present, self.num_heads, dtype=dtype).view(
                batch_size, self.num_heads, 1, -1
            )
            mask = torch.masked_fill(alibi / math.sqrt(self.head_dim), mask < -1, torch.finfo(dtype).min)
        return {
            "position_ids": position_ids,
            "position_embeddings": None if self.alibi else self.rotary(hidden_states, position_ids),
            "attention_mask": mask,
        }

    def run_block(
        self, block: nn.Module, hidden_states: torch.Tensor, inputs: dict[str, Any], cache: Any
    ) -> torch.Tensor:
        output = block(hidden_states, layer_past=cache, use_cache=cache is not None, **inputs)
        return output[0] if isinstance(output, tuple) else output
