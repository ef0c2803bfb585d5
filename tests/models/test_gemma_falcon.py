"""What the shared table (test_span_matches_transformers) does not cover of Gemma 2 and Falcon: Gemma 2's layer types
by index in the model and its tied, scaled, soft-capped head; Falcon's 7B-style (multi-query, one LayerNorm) and ALiBi
variants (the table has the 40B/180B style)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.models import get_family, load_client_head, load_span
from nectar.models.tiny import save_tiny_checkpoint

ATOL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= ATOL, f"max abs difference {difference} > {ATOL}"


def input_ids(batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 1000, (batch_size, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    paths = {
        "gemma2-tied": save_tiny_checkpoint(root / "gemma2-tied", "gemma2", tie_word_embeddings=True, seed=5),
        "falcon-7b": save_tiny_checkpoint(root / "falcon-7b", "falcon-7b", seed=6),
        "falcon-alibi": save_tiny_checkpoint(root / "falcon-alibi", "falcon-alibi", seed=6),
    }
    return {kind: (path, AutoModelForCausalLM.from_pretrained(str(path)).eval()) for kind, path in paths.items()}


def test_gemma2_blocks_take_their_layer_type_from_their_index_in_the_model(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "gemma2", "gemma2")
    span = load_span(path, 1, 4)  # model layers 1 (global), 2 (sliding), 3 (global)
    kinds = [(block.self_attn.layer_type, block.self_attn.sliding_window) for block in span.blocks]
    assert kinds == [("full_attention", None), ("sliding_attention", 4), ("full_attention", None)]
    assert [block.self_attn.layer_idx for block in span.blocks] == [0, 1, 2]  # cache slots are the span's
    family = get_family("gemma2")
    assert family.batch_runner([span]) is None and "soft-capping" in family.generic_path_reason([span])


def test_gemma2_tied_head_scales_embeddings_and_soft_caps_logits(checkpoints, reference_hidden_states, greedy_generate):
    path, model = checkpoints["gemma2-tied"]
    head = load_client_head(path)
    assert head.word_embeddings.weight.data_ptr() == head.lm_head.weight.data_ptr()
    ids = input_ids(2, 9)
    states = reference_hidden_states(model, ids)
    close(head.embed(ids), states[0])  # sqrt(hidden_size) times the table's rows
    assert not torch.allclose(head.word_embeddings(ids), states[0])
    with torch.no_grad():
        expected = model(ids).logits
    output = load_span(path, 0, 4)(states[0])
    close(head.logits(output), expected)
    raw = head.lm_head(head.norm(output))
    assert expected.abs().max() < 1.0 < raw.abs().max()  # the cap (1.0) bites
    spans = [load_span(path, 0, 1), load_span(path, 1, 4)]
    prompt = input_ids(1, 5, seed=1)
    with torch.no_grad():
        reference = model.generate(prompt, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(greedy_generate(head, spans, prompt, 8), reference)


@pytest.mark.parametrize("kind", ["falcon-7b", "falcon-alibi"])
def test_falcon_variants_match_transformers(kind, checkpoints, reference_hidden_states, run_spans, greedy_generate):
    path, model = checkpoints[kind]
    head = load_client_head(path)
    assert load_span(path, 0, 1).kv_layout.num_heads == (1 if kind == "falcon-7b" else 4)  # what the layer caches
    ids = input_ids(2, 10, seed=2)
    states = reference_hidden_states(model, ids)
    for start, end in [(0, 2), (2, 3), (0, 4)]:
        output = load_span(path, start, end)(states[start])
        close(head.norm(output) if end == 4 else output, states[end])
    spans = [load_span(path, 0, 2), load_span(path, 2, 4)]
    caches = [span.new_cache(2, 10) for span in spans]
    pieces = [run_spans(spans, head.embed(ids[:, :3]), caches)]
    pieces += [run_spans(spans, head.embed(ids[:, t : t + 1]), caches) for t in range(3, 10)]
    with torch.no_grad():
        close(head.logits(torch.cat(pieces, dim=1)), model(ids).logits)
        reference = model.generate(ids[:1, :5], do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(greedy_generate(head, spans, ids[:1, :5], 8), reference)
