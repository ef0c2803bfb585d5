"""The Qwen2 family: ``Qwen2DecoderLayer`` blocks through the Llama family's code; an optional sliding window."""

from __future__ import annotations

import logging

from transformers import PretrainedConfig

from nectar.models.errors import UnsupportedModelError
from nectar.models.families.llama.model import LlamaFamily

logger = logging.getLogger(__name__)


def uniform_window(config: PretrainedConfig) -> int | None:
    """The attention window every block shares, from ``config.layer_types`` (Qwen2/Qwen3 style): None when all are
    full attention. A span's runner applies one mask to all its blocks, so mixed layer types are refused."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return config.sliding_window
    raise UnsupportedModelError(
        f"this {config.model_type} checkpoint mixes sliding-window and full-attention layers (use_sliding_window with "
        f"max_window_layers={getattr(config, 'max_window_layers', None)}); Nectar runs one attention kind per model"
    )


class Qwen2Family(LlamaFamily):
    """Qwen2DecoderLayer blocks (q/k/v biases), Qwen2RMSNorm head."""

    name = "qwen2"
    model_types = ("qwen2",)
    class_prefix = "Qwen2"

    def prepare_config(self, config: PretrainedConfig) -> None:
        super().prepare_config(config)
        uniform_window(config)  # refuses mixed layer types at load, before any block is built

    def sliding_window(self, config: PretrainedConfig) -> int | None:
        return uniform_window(config)
