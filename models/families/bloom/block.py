"""Runs transformers' BloomBlock over a span: ALiBi over absolute key positions, explicit causal masks."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from nectar.models.attention import AttentionStep
from nectar.models.family import BlockRunner

logger = logging.getLogger(__name__)


class BloomRunner(BlockRunner):
    """Builds the ALiBi bias for keys ``[0, key_length)`` once per step and feeds it to every block.

    :param config: the BLOOM config
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.num_heads = config.n_head

    def step_inputs(self, hidden_states: torch.Tensor, step: AttentionStep) -> dict[str, Any]:
        batch_size = hidden_states.shape[0]
        keys_present = torch.ones(batch_size, step.key_length, device=hidden_states.device)
        mask = None
        if step.query_length > 1:  # BLOOM's eager attention only adds the mask it is given
            mask = step.causal_mask(dtype=hidden_states.dtype, device=hidden_states.device)
        return {
            "alibi": build_alibi_tensor(keys_present, self.num_heads, dtype=hidden_states.dtype),
            "attention_mask": mask,
        }

    def run_block(
        self, block: nn.Module, hidden_states: torch.Tensor, inputs: dict[str, Any], cache: Any
    ) -> torch.Tensor:
        output = block(hidden_states, layer_past=cache, use_cache=cache is not None, **inputs)
        return output[0] if isinstance(output, tuple) else output
