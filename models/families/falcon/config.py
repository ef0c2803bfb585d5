"""Where Falcon's tensors live in its checkpoints (with or without the ``transformer.`` base prefix)."""

import logging

logger = logging.getLogger(__name__)

BLOCK_PREFIXES = ("transformer.h.{index}.", "h.{index}.")
HEAD_SOURCES = {
    "word_embeddings.weight": ("transformer.word_embeddings.weight", "word_embeddings.weight"),
    "final_norm.weight": ("transformer.ln_f.weight", "ln_f.weight"),
    "final_norm.bias": ("transformer.ln_f.bias", "ln_f.bias"),
    "lm_head.weight": ("lm_head.weight",),
}
