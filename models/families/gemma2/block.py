"""Runs transformers' Gemma2DecoderLayer over a span: RoPE at absolute positions, each layer its type's mask."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

from nectar.models.attention import AttentionStep
from nectar.models.families.gemma2.config import SLIDING
from nectar.models.family import BlockRunner

logger = logging.getLogger(__name__)


class Gemma2Runner(BlockRunner):
    """Shares one rotary table across the span's blocks; builds a global and a sliding-window mask per step and hands
    each block the one of its ``layer_type`` (set from the block's index in the model, see ``Gemma2Family``).

    Attention is eager (soft-capping is applied to the scores before the mask), so every multi-token step is masked.

    :param config: the Gemma 2 config
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.rotary = Gemma2RotaryEmbedding(config=config)
        self.sliding_window = config.sliding_window

    def step_inputs(self, hidden_states: torch.Tensor, step: AttentionStep) -> dict[str, Any]:
        position_ids = step.position_ids(hidden_states.device)
        masks = {}
        for layer_type, window in (("full_attention", None), (SLIDING, self.sliding_window)):
            needed = step.query_length > 1 or (window is not None and step.key_length > window)
            masks[layer_type] = (
                step.causal_mask(dtype=hidden_states.dtype, device=hidden_states.device, sliding_window=window)
                if needed
                else None
            )
        return {
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden_states, position_ids),
            "masks": masks,
        }

    def run_block(
        self, block: nn.Module, hidden_states: torch.Tensor, inputs: dict[str, Any], cache: Any
    ) -> torch.Tensor:
        layer_type = SLIDING if block.self_attn.layer_type == SLIDING else "full_attention"
        output = block(
            hidden_states,
            position_embeddings=inputs["position_embeddings"],
            attention_mask=inputs["masks"][layer_type],
            position_ids=inputs["position_ids"],
            cache=cache,
        )
        return output[0] if isinstance(output, tuple) else output
