"""Tiny random-weight checkpoints (Llama with GQA, Mistral, BLOOM) for tests and local demos; no hub needed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, MistralConfig, PretrainedConfig

logger = logging.getLogger(__name__)


def tiny_config(
    kind: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 1000,
    tie_word_embeddings: bool | None = None,
    **extra,
) -> PretrainedConfig:
    """A small config: "llama" (4 query / 2 key-value heads), "mistral" (plus a sliding window) or "bloom";
    ``extra`` sets further fields of the llama/mistral config (e.g. ``attention_bias=True``)."""
    if kind in ("llama", "mistral"):
        common = (
            dict(
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=4,
                num_key_value_heads=2,  # GQA
                vocab_size=vocab_size,
                max_position_embeddings=512,
                initializer_range=0.1,  # larger than the default so random logits are far from ties
                tie_word_embeddings=bool(tie_word_embeddings),
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            )
            | extra
        )
        return LlamaConfig(**common) if kind == "llama" else MistralConfig(sliding_window=6, **common)
    if kind == "bloom":
        return BloomConfig(
            hidden_size=hidden_size,
            n_layer=num_layers,
            n_head=4,
            vocab_size=vocab_size,
            initializer_range=0.1,
            tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}: use 'llama', 'mistral' or 'bloom'")


def save_tiny_checkpoint(path: str | os.PathLike, kind: str = "llama", *, seed: int = 0, **config_kwargs) -> Path:
    """Write a random-weight ``kind`` model to ``path`` with ``save_pretrained`` (config.json + model.safetensors)."""
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **config_kwargs), dtype=torch.float32)
    model.save_pretrained(str(path))
    logger.debug("Saved tiny %s checkpoint to %s", kind, path)
    return path


def save_tiny_lora(
    path: str | os.PathLike,
    base_path: str | os.PathLike,
    *,
    seed: int = 0,
    rank: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj"),
) -> Path:
    """A PEFT LoRA adapter of the checkpoint at ``base_path`` with random non-zero A and B (PEFT starts B at zero,
    which would change nothing), saved with ``save_pretrained``; needs ``peft``."""
    from peft import LoraConfig, get_peft_model

    path = Path(path)
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(str(path))
    return path
