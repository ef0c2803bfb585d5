"""Tiny random-weight checkpoints (Llama with GQA, Mistral, Qwen2, Qwen3, Mixtral, BLOOM, Gemma 2, Falcon) for tests
and local demos; no hub needed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

logger = logging.getLogger(__name__)

LLAMA_SHAPED = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mixtral": MixtralConfig,
}
RANDOM_BIASES_AND_NORMS = frozenset({"qwen2", "qwen3", "mixtral"})  # older kinds: weights as benchmarked


def tiny_config(
    kind: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 1000,
    tie_word_embeddings: bool | None = None,
    **extra,
) -> PretrainedConfig:
    """A small config: "llama" (4 query / 2 key-value heads), "mistral" (plus a sliding window), "qwen2" (plus q/k/v
    biases), "qwen3" (plus q/k norms), "mixtral" (plus 4 experts, 2 per token), "bloom", "gemma2" (soft-capping strong
    enough to change its greedy text, a 4-token window on alternate layers; untied unless asked), "falcon" (40B/180B
    style: grouped KV heads, RoPE), "falcon-7b" (multi-query, parallel attention) or "falcon-alibi"; ``extra`` sets
    further fields of a non-BLOOM config (e.g. ``attention_bias=True``)."""
    if kind in LLAMA_SHAPED:
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
        if kind == "mistral":
            return MistralConfig(sliding_window=6, **common)
        if kind == "qwen3":
            return Qwen3Config(**{"head_dim": hidden_size // 4} | common)
        if kind == "mixtral":
            return MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2} | common)
        return LLAMA_SHAPED[kind](**common)
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
    special = dict(
        vocab_size=vocab_size,
        initializer_range=0.1,
        tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if kind == "gemma2":
        gemma2 = dict(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            query_pre_attn_scalar=24,  # not head_dim, so a wrong scale shows
            sliding_window=4,
            attn_logit_softcapping=2.0,  # small caps: random scores and logits reach them
            final_logit_softcapping=1.0,
            max_position_embeddings=512,
        )
        if tie_word_embeddings is None:  # tied, the tiny model's own token dominates its logits: it repeats itself
            special["tie_word_embeddings"] = False
        return Gemma2Config(**gemma2 | special | extra)
    falcon_variants = {
        "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
        "falcon-7b": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
        "falcon-alibi": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True),
    }
    if kind in falcon_variants:
        falcon = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            ffn_hidden_size=2 * hidden_size,
            max_position_embeddings=512,
        )
        return FalconConfig(**falcon | special | falcon_variants[kind] | extra)
    raise ValueError(
        f"unknown tiny model kind {kind!r}: use one of {', '.join(LLAMA_SHAPED)}, 'bloom', 'gemma2', 'falcon', "
        "'falcon-7b' or 'falcon-alibi'"
    )


def save_tiny_checkpoint(path: str | os.PathLike, kind: str = "llama", *, seed: int = 0, **config_kwargs) -> Path:
    """Write a random-weight ``kind`` model to ``path`` with ``save_pretrained`` (config.json + model.safetensors)."""
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **config_kwargs), dtype=torch.float32)
    if kind in RANDOM_BIASES_AND_NORMS:
        # transformers starts biases at 0 and norms at 1: random ones make a test see a dropped bias or norm weight
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".bias") or "norm" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(str(path))
    logger.debug("Saved tiny %s checkpoint to %s", kind, path)
    return path


def save_tiny_sharded_checkpoint(
    path: str | os.PathLike, *, seed: int = 0, max_shard_size: str = "200KB", **config_kwargs
) -> Path:
    """A tiny random Llama saved in shards of about one block (blocks land in different files), with a word-level
    tokenizer ("w5 w6" -> [5, 6]): a stand-in for a Hub repo's files."""
    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_config("llama", **config_kwargs)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        str(path), max_shard_size=max_shard_size
    )
    save_word_tokenizer(path, config.vocab_size)
    return path


def save_word_tokenizer(path: str | os.PathLike, vocab_size: int) -> None:
    """A word-level tokenizer of ``vocab_size`` ids ("w5 w6" -> [5, 6]; 0-2 unk, bos, eos) saved into ``path``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(str(path))


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


def save_prequantized_checkpoint(path: str | os.PathLike, float_path: str | os.PathLike, mode: str = "nf4") -> Path:
    """The checkpoint at ``float_path`` quantized by transformers + bitsandbytes on the CPU (``nf4``: 4-bit NF4 with
    double-quantized absmax, blocks of 64; ``int8``: weight rows and their scales) and saved with ``save_pretrained``:
    the layout of published ``*-bnb-4bit`` checkpoints (``nectar.models.prequant``)."""
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        spec = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    elif mode == "int8":
        spec = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"pre-quantized checkpoints are nf4 or int8, not {mode!r}")
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(float_path), quantization_config=spec, device_map="cpu", dtype=torch.float32
    )
    model.save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(float_path) / name).is_file():
            (path / name).write_bytes((Path(float_path) / name).read_bytes())
    return path
