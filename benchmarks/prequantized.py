"""Random pre-quantized nf4 Llama checkpoints (issue 25, point 5): the Llama-2-70B-shaped run's weights.

A 70B float16 checkpoint is 138 GB (more than the GPU machine's 64 GiB disk), so it is never written: each tensor is
drawn (seeded), block linear weights are quantized at once (on the GPU when there is one: these random codes *are*
the checkpoint, so CPU-determinism does not matter here) and written in bitsandbytes' layout as transformers saves it
(``nectar.models.prequant``), shard by shard. Embeddings, norms and the LM head stay float16. About 37 GB for 70B.

    python benchmarks/prequantized.py --model llama2-70b --device cuda     # prints the folder
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from pathlib import Path

import common
import torch
from common import bench_dir, llama_config, log

LINEARS = (
    ("self_attn.q_proj", "q"),
    ("self_attn.k_proj", "kv"),
    ("self_attn.v_proj", "kv"),
    ("self_attn.o_proj", "o"),
    ("mlp.gate_proj", "up"),
    ("mlp.up_proj", "up"),
    ("mlp.down_proj", "down"),
)


def _shapes(config) -> dict[str, tuple[int, int]]:
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return {
        "q": (hidden, hidden),
        "kv": (kv, hidden),
        "o": (hidden, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }


def quantization_config() -> dict:
    """What transformers writes into config.json for a ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)``
    model (float16 compute)."""
    from transformers import BitsAndBytesConfig

    spec = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    )
    return spec.to_dict() | {"quant_method": "bitsandbytes"}


class _ShardWriter:
    """Collects tensors (on the CPU) and writes a safetensors shard whenever ``shard_bytes`` are pending."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        filename = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / filename), metadata={"format": "pt"})
        self.files.append(filename)
        self.weight_map.update(dict.fromkeys(self.pending, filename))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Renames the shards as transformers names them (``-of-N``) and writes the index."""
        self.flush()
        count = len(self.files)
        renamed = {old: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i, old in enumerate(self.files)}
        for old, new in renamed.items():
            (self.folder / old).rename(self.folder / new)
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {name: renamed[file] for name, file in sorted(self.weight_map.items())},
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_nf4_checkpoint(
    path: str | os.PathLike, config, *, seed: int = 0, device: str = "cpu", shard_bytes: int = 2 * 1024**3
) -> Path:
    """Writes a random Llama ``config`` checkpoint whose block linear layers are nf4 (bitsandbytes' layout) into
    ``path`` (a temporary sibling first, renamed when complete); returns ``path``. Floats are drawn as transformers
    initializes them (normal, std ``initializer_range``); norms are ones."""
    import bitsandbytes as bnb

    from nectar.models.tiny import save_word_tokenizer

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(tmp, shard_bytes)
    generator = torch.Generator(device).manual_seed(seed)
    std = config.initializer_range

    def draw(shape) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float16).mul_(std)

    hidden, shapes = config.hidden_size, _shapes(config)
    began = time.perf_counter()
    writer.add("model.embed_tokens.weight", draw((config.vocab_size, hidden)))
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, kind in LINEARS:
            packed, state = bnb.functional.quantize_4bit(
                draw(shapes[kind]), blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            writer.add(f"{prefix}{name}.weight", packed)
            for suffix, tensor in state.as_dict(packed=True).items():
                writer.add(f"{prefix}{name}.weight.{suffix}", tensor)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            writer.add(f"{prefix}{norm}.weight", torch.ones(hidden, dtype=torch.float16))
        if layer % 10 == 9 or layer == config.num_hidden_layers - 1:
            done, seconds = (writer.total + writer.pending_bytes) / 1e9, time.perf_counter() - began
            log(f"  {layer + 1}/{config.num_hidden_layers} blocks, {done:.1f} GB, {seconds:.0f}s")
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.float16))
    writer.add("lm_head.weight", draw((config.vocab_size, hidden)))
    writer.finish()
    config.quantization_config = quantization_config()
    config.save_pretrained(str(tmp))
    save_word_tokenizer(tmp, config.vocab_size)
    tmp.rename(path)
    return path


def nf4_checkpoint(size: str, *, device: str = "cpu", seed: int = 0) -> Path:
    """The random nf4 checkpoint of ``size`` (``common.SIZES``), built once into ``bench_dir()`` and then reused."""
    path = bench_dir() / f"llama-{size}-nf4"
    if (path / "model.safetensors.index.json").exists():
        return path
    log(f"building the random nf4 {size} checkpoint at {path} (on {device})")
    return build_nf4_checkpoint(path, llama_config(size), seed=seed, device=device)


def weight_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of the checkpoint's tensors from its shards' headers (nothing is read): ``blocks`` (every block tensor:
    nf4 codes, their scales, norms) and ``head`` (final norm and LM head), what one decode step reads."""
    path = Path(path)
    indexed = path / "model.safetensors.index.json"
    # a small checkpoint is one file with no index
    files = set(json.loads(indexed.read_text())["weight_map"].values()) if indexed.exists() else {"model.safetensors"}
    sizes: dict[str, int] = {}
    for filename in files:
        with open(path / filename, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    blocks = sum(size for name, size in sizes.items() if name.startswith("model.layers."))
    head = sum(size for name, size in sizes.items() if name in ("model.norm.weight", "lm_head.weight"))
    return {"blocks": blocks, "head": head}


def copy_bandwidth(device: str, megabytes: int = 2048, repeats: int = 10) -> float:
    """Bytes/s a device-to-device copy moves (reads plus writes): the memory bandwidth a decode step can reach."""
    if not device.startswith("cuda"):
        return math.nan
    source = torch.empty(megabytes * 1024**2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    del source, target
    torch.cuda.empty_cache()
    return 2 * megabytes * 1024**2 * repeats / seconds


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(common.SIZES), default="llama2-70b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    path = nf4_checkpoint(args.model, device=args.device)
    sizes = weight_bytes(path)
    print(f"{path}: blocks {sizes['blocks'] / 1e9:.2f} GB, head {sizes['head'] / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
