"""The Qwen3 family: ``Qwen3DecoderLayer`` blocks through the Llama family's code (the Qwen2 family's window rule)."""

from __future__ import annotations

import logging

from nectar.models.families.qwen2.model import Qwen2Family

logger = logging.getLogger(__name__)


class Qwen3Family(Qwen2Family):
    """Qwen3DecoderLayer blocks (q/k norms, optional attention biases), Qwen3RMSNorm head."""

    name = "qwen3"
    model_types = ("qwen3",)
    class_prefix = "Qwen3"
