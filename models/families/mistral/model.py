"""The Mistral family: the Llama family's blocks and head, with ``config.sliding_window`` honoured in the masks."""

from __future__ import annotations

import logging

from transformers import PretrainedConfig

from nectar.models.families.llama.model import LlamaFamily

logger = logging.getLogger(__name__)


class MistralFamily(LlamaFamily):
    """MistralDecoderLayer blocks; the window keeps them on the generic path (the fused kernels have none)."""

    name = "mistral"
    model_types = ("mistral",)
    class_prefix = "Mistral"

    def sliding_window(self, config: PretrainedConfig) -> int | None:
        return getattr(config, "sliding_window", None)
