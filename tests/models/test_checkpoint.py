"""Spans and heads read only their own tensors: sharded checkpoints with the other shards deleted still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nectar.models import Checkpoint, CheckpointError, MissingCheckpointFileError, load_client_head, load_span

BLOCK_PREFIXES = {kind: "model.layers." for kind in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma2")} | {
    "bloom": "transformer.h.",
    "falcon": "transformer.h.",
}


def shard_per_block(source: Path, target: Path, block_prefix: str) -> dict[str, str]:
    """Rewrite a single-file checkpoint as one shard per block plus a shard for the rest, with an index."""
    shutil.copytree(source, target)
    single = target / "model.safetensors"
    groups: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(single), framework="pt") as handle:
        for key in handle.keys():
            if key.startswith(block_prefix):
                shard = f"block-{int(key[len(block_prefix) :].split('.')[0]):02d}.safetensors"
            else:
                shard = "rest.safetensors"
            groups.setdefault(shard, {})[key] = handle.get_tensor(key)
    single.unlink()
    weight_map = {}
    for shard, tensors in groups.items():
        save_file(tensors, str(target / shard), metadata={"format": "pt"})
        weight_map.update({key: shard for key in tensors})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.fixture
def sharded(kind, tiny_paths, tmp_path):
    return tmp_path / "sharded", shard_per_block(tiny_paths[kind], tmp_path / "sharded", BLOCK_PREFIXES[kind])


def test_span_loads_with_other_blocks_shards_deleted(kind, tiny_paths, sharded):
    folder, weight_map = sharded
    expected = load_span(tiny_paths[kind], 1, 3)
    for shard in {"rest.safetensors", "block-00.safetensors", "block-03.safetensors"}:
        (folder / shard).unlink()
    span = load_span(folder, 1, 3)
    hidden = torch.randn(1, 5, 64)
    assert torch.equal(span(hidden), expected(hidden))


def test_head_loads_with_every_block_shard_deleted(kind, tiny_paths, sharded):
    folder, _ = sharded
    for shard in folder.glob("block-*.safetensors"):
        shard.unlink()
    head, expected = load_client_head(folder), load_client_head(tiny_paths[kind])
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(head.embed(ids), expected.embed(ids))
    # each head times both BLAS libraries at load: the two may sum in different orders
    torch.testing.assert_close(head.logits(head.embed(ids)), expected.logits(expected.embed(ids)), rtol=1e-5, atol=1e-6)


def test_checkpoint_reads_only_requested_tensors(kind, tiny_paths):
    checkpoint = Checkpoint(tiny_paths[kind])
    prefix = BLOCK_PREFIXES[kind] + "2."
    keys = [key for key in checkpoint.keys() if key.startswith(prefix)]
    tensors = checkpoint.load(keys, dtype=torch.float16)
    assert sorted(tensors) == sorted(keys) == sorted(checkpoint.loaded_keys)
    assert all(tensor.dtype == torch.float16 for tensor in tensors.values())


def test_missing_shard_error_names_the_file(kind, sharded):
    folder, _ = sharded
    (folder / "block-02.safetensors").unlink()
    load_span(folder, 0, 2)  # blocks 0-1 do not need it
    with pytest.raises(MissingCheckpointFileError, match="block-02.safetensors") as caught:
        load_span(folder, 1, 3)
    assert caught.value.filename.endswith("block-02.safetensors")


def test_folder_without_weights_names_the_expected_files(tmp_path, tiny_paths):
    shutil.copy(tiny_paths["llama"] / "config.json", tmp_path / "config.json")
    with pytest.raises(MissingCheckpointFileError, match="model.safetensors"):
        load_span(tmp_path, 0, 1)
    with pytest.raises(MissingCheckpointFileError, match="model.safetensors"):
        load_client_head(tmp_path)


def test_malformed_index_is_a_clear_error(tmp_path, tiny_paths):
    shutil.copy(tiny_paths["llama"] / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_span(tmp_path, 0, 1)


def test_block_missing_from_checkpoint_is_a_clear_error(kind, sharded):
    folder, weight_map = sharded
    prefix = BLOCK_PREFIXES[kind] + "3."
    index = {key: shard for key, shard in weight_map.items() if not key.startswith(prefix)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(CheckpointError, match="no tensors for block 3"):
        load_span(folder, 2, 4)


def test_bare_model_checkpoint_without_base_prefix(tiny_paths, tmp_path):
    """BLOOM checkpoints saved from BloomModel name tensors `h.0...`, `word_embeddings...` (no `transformer.`)."""
    source = tiny_paths["bloom"]
    shutil.copytree(source, tmp_path / "bare")
    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
        tensors = {key.removeprefix("transformer."): handle.get_tensor(key) for key in handle.keys()}
    assert "h.0.input_layernorm.weight" in tensors
    save_file(tensors, str(tmp_path / "bare" / "model.safetensors"), metadata={"format": "pt"})
    hidden = torch.randn(1, 4, 64)
    assert torch.equal(load_span(tmp_path / "bare", 0, 4)(hidden), load_span(source, 0, 4)(hidden))
    ids = torch.tensor([[7, 8, 9]])
    head, expected = load_client_head(tmp_path / "bare"), load_client_head(source)
    assert torch.equal(head.embed(ids), expected.embed(ids))
    # each head times both BLAS libraries at load: the two may sum in different orders
    torch.testing.assert_close(head.logits(head.embed(ids)), expected.logits(expected.embed(ids)), rtol=1e-5, atol=1e-6)


def test_tied_llama_head_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from nectar.models.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in Checkpoint(path)  # transformers does not store the tied copy
    head = load_client_head(path)
    assert head.lm_head.weight is head.word_embeddings.weight
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = torch.tensor([[3, 14, 15, 92]])
    with torch.no_grad():
        expected = model(ids).logits
    output = load_span(path, 0, 4)(head.embed(ids))
    torch.testing.assert_close(head.logits(output), expected, atol=1e-4, rtol=0)
