"""The Qwen2, Qwen3 and Mixtral families against transformers beyond the shared table (test_span_matches_transformers):
per-block hidden states through KV-cached decode steps, Qwen's sliding-window rule, Mixtral's checkpoint layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from nectar.models import UnsupportedModelError, load_client_head, load_span
from nectar.models.tiny import save_tiny_checkpoint

ATOL = 1e-4


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mixtral"])
def test_cached_steps_match_every_hidden_state(kind, tiny_paths, reference_models, reference_hidden_states):
    """A prefill then single-token steps through two cached spans: each span's output equals transformers' hidden
    state at that block boundary, token by token."""
    path, model = tiny_paths[kind], reference_models[kind]
    ids = _ids(2, 10, seed=5)
    states = reference_hidden_states(model, ids)
    spans, head = [load_span(path, 0, 2), load_span(path, 2, 4)], load_client_head(path)
    caches = [span.new_cache(2, 10) for span in spans]
    for begin, end in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10)]:
        middle = spans[0](states[0][:, begin:end], cache=caches[0])
        torch.testing.assert_close(middle, states[2][:, begin:end], atol=ATOL, rtol=0)
        last = head.norm(spans[1](middle, cache=caches[1]))
        torch.testing.assert_close(last, states[4][:, begin:end], atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def windowed_qwen2(tmp_path_factory):
    """Qwen2 with sliding-window attention in every layer (max_window_layers=0): window 4 over 12 tokens."""
    path = save_tiny_checkpoint(
        tmp_path_factory.mktemp("qwen2-window") / "m",
        "qwen2",
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
    )
    return path, AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_qwen2_sliding_window_matches_transformers(windowed_qwen2, run_spans):
    path, model = windowed_qwen2
    assert set(model.config.layer_types) == {"sliding_attention"}
    ids = _ids(1, 12, seed=6)
    with torch.no_grad():
        expected = model(ids).logits
    spans, head = [load_span(path, 0, 4)], load_client_head(path)
    assert spans[0].runner.sliding_window == 4
    caches = [spans[0].new_cache(1, 12)]
    pieces = [run_spans(spans, head.embed(ids[:, a:b]), caches) for a, b in [(0, 6), (6, 7), (7, 10), (10, 11)]]
    pieces.append(run_spans(spans, head.embed(ids[:, 11:]), caches))
    torch.testing.assert_close(head.logits(torch.cat(pieces, dim=1)), expected, atol=ATOL, rtol=0)
    # and the window matters: without it the same steps differ
    spans[0].runner.sliding_window = None
    assert not torch.allclose(head.logits(run_spans(spans, head.embed(ids))), expected, atol=1e-2)


def test_mixed_attention_layers_are_refused_with_the_reason(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "m", "qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    with pytest.raises(UnsupportedModelError, match="mixes sliding-window and full-attention layers"):
        load_span(path, 0, 1)


def test_mixtral_loads_per_expert_and_stacked_checkpoints(tiny_paths, tmp_path):
    """Mixtral checkpoints store one matrix per expert (as shipped, and as save_pretrained writes); a checkpoint
    already in transformers' stacked layout loads to the same span."""
    source = tiny_paths["mixtral"]
    stored = load_file(str(source / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in stored
    model = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    stacked = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in stacked
    save_file(stacked, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"
    per_expert, in_place = load_span(source, 1, 3), load_span(tmp_path, 1, 3)
    for (name, theirs), (_, ours) in zip(
        model.model.layers[1].state_dict().items(), per_expert.blocks[0].state_dict().items()
    ):
        assert torch.equal(ours, theirs), name
    hidden = torch.randn(1, 5, 64)
    assert torch.equal(per_expert(hidden), in_place(hidden))
