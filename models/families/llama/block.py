"""Runs transformers' Llama-shaped decoder layers over a span: RoPE at absolute positions, explicit causal masks."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from nectar.models.attention import AttentionStep
from nectar.models.family import BlockRunner

logger = logging.getLogger(__name__)


def cache_keyword(decoder_layer: type[nn.Module]) -> str:
    # transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning)
    return "cache" if "cache" in inspect.signature(decoder_layer.forward).parameters else "past_key_values"


class LlamaRunner(BlockRunner):
    """Shares one rotary table across the span's blocks; builds masks only where SDPA's ``is_causal`` is not exact.

    :param config: the model config (its ``_attn_implementation`` is already set)
    :param rotary: the variant's rotary embedding module
    :param cache_kwarg: the decoder layer's name for its cache argument
    :param sliding_window: attention window in tokens, or None
    """

    def __init__(self, config: PretrainedConfig, *, rotary: nn.Module, cache_kwarg: str, sliding_window: int | None):
        super().__init__()
        self.rotary = rotary
        self.cache_kwarg = cache_kwarg
        self.sliding_window = sliding_window
        self.always_mask = config._attn_implementation != "sdpa"  # eager attention applies no causality by itself

    def step_inputs(self, hidden_states: torch.Tensor, step: AttentionStep) -> dict[str, Any]:
        position_ids = step.position_ids(hidden_states.device)
        mask = None
        if (self.always_mask and step.query_length > 1) or step.needs_mask(self.sliding_window):
            mask = step.causal_mask(
                dtype=hidden_states.dtype, device=hidden_states.device, sliding_window=self.sliding_window
            )
        return {
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden_states, position_ids),
            "attention_mask": mask,
        }

    def run_block(
        self, block: nn.Module, hidden_states: torch.Tensor, inputs: dict[str, Any], cache: Any
    ) -> torch.Tensor:
        output = block(hidden_states, use_cache=cache is not None, **{self.cache_kwarg: cache}, **inputs)
        return output[0] if isinstance(output, tuple) else output
