"""Where Gemma 2's tensors live in its checkpoints (``Gemma2ForCausalLM``, or a bare ``Gemma2Model``)."""

import logging

logger = logging.getLogger(__name__)

BLOCK_PREFIXES = ("model.layers.{index}.", "layers.{index}.")
HEAD_SOURCES = {
    "word_embeddings.weight": ("model.embed_tokens.weight", "embed_tokens.weight"),
    "final_norm.weight": ("model.norm.weight", "norm.weight"),
    "lm_head.weight": ("lm_head.weight",),
}
SLIDING = "sliding_attention"  # config.layer_types entry of a local (sliding-window) layer
