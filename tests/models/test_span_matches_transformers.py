"""BlockSpan / ClientHead against transformers' full models: every split, caches, chunks, crop, generation, prompts."""

from __future__ import annotations

import itertools

import pytest
import torch

from nectar.models import load_client_head, load_span

NUM_LAYERS = 4
ATOL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= atol, f"max abs difference {difference} > {atol}"


def input_ids(batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (batch_size, length), generator=generator)


@pytest.fixture
def setup(kind, tiny_paths, reference_models):
    path = tiny_paths[kind]
    return path, reference_models[kind], load_client_head(path)


def test_embeddings_match_block0_input(setup, reference_hidden_states):
    path, model, head = setup
    ids = input_ids(2, 7)
    close(head.embed(ids), reference_hidden_states(model, ids)[0])
    assert head.vocab_size == model.config.vocab_size and head.embedding_dim == model.config.hidden_size


@pytest.mark.parametrize("start,end", [(a, b) for a, b in itertools.combinations(range(NUM_LAYERS + 1), 2)])
def test_every_span_matches_hidden_states(setup, reference_hidden_states, start, end):
    path, model, head = setup
    ids = input_ids(2, 9)
    states = reference_hidden_states(model, ids)
    span = load_span(path, start, end)
    assert (span.start, span.end, span.num_blocks) == (start, end, end - start)
    output = span(states[start])
    # the last reported hidden state is after the final norm, which the client applies
    close(head.norm(output) if end == NUM_LAYERS else output, states[end])


@pytest.mark.parametrize("splits", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]])
def test_chained_spans_equal_the_full_model(setup, run_spans, splits):
    path, model, head = setup
    ids = input_ids(1, 11)
    spans = [load_span(path, start, end) for start, end in splits]
    with torch.no_grad():
        expected = model(ids).logits
    close(head.logits(run_spans(spans, head.embed(ids))), expected)


def test_incremental_decoding_equals_full_forward(setup, run_spans):
    path, model, head = setup
    ids = input_ids(2, 12)  # longer than the tiny Mistral's sliding window (6)
    spans = [load_span(path, 0, 2), load_span(path, 2, 4)]
    with torch.no_grad():
        expected = model(ids).logits
    caches = [span.new_cache(2, 12) for span in spans]
    pieces = [run_spans(spans, head.embed(ids[:, :4]), caches)]
    for position in range(4, 12):
        pieces.append(run_spans(spans, head.embed(ids[:, position : position + 1]), caches))
        assert all(cache.length == position + 1 for cache in caches)
    close(head.logits(torch.cat(pieces, dim=1)), expected)


def test_multi_token_chunks_after_a_prefix(setup, run_spans):
    path, model, head = setup
    ids = input_ids(1, 13, seed=1)
    spans = [load_span(path, 0, 3), load_span(path, 3, 4)]
    with torch.no_grad():
        expected = model(ids).logits
    caches = [span.new_cache(1, 16) for span in spans]
    pieces = [run_spans(spans, head.embed(ids[:, a:b]), caches) for a, b in [(0, 3), (3, 7), (7, 8), (8, 13)]]
    close(head.logits(torch.cat(pieces, dim=1)), expected)


def test_crop_then_refeed_gives_identical_output(setup, run_spans):
    path, model, head = setup
    ids = input_ids(1, 10, seed=2)
    spans = [load_span(path, 0, 2), load_span(path, 2, 4)]
    caches = [span.new_cache(1, 10) for span in spans]
    run_spans(spans, head.embed(ids[:, :6]), caches)
    first = run_spans(spans, head.embed(ids[:, 6:8]), caches)
    for cache in caches:
        cache.crop(6)
    assert torch.equal(run_spans(spans, head.embed(ids[:, 6:8]), caches), first)
    # a different continuation after the crop matches the full forward of that sequence
    for cache in caches:
        cache.crop(6)
    other = ids.clone()
    other[:, 6:8] = torch.tensor([[5, 6]])
    tail = run_spans(spans, head.embed(other[:, 6:10]), caches)
    with torch.no_grad():
        expected = model(other).logits[:, 6:10]
    close(head.logits(tail), expected)


def test_greedy_generation_matches_transformers_generate(setup, greedy_generate):
    path, model, head = setup
    ids = input_ids(1, 5, seed=3)
    spans = [load_span(path, 0, 2), load_span(path, 2, 4)]
    with torch.no_grad():
        expected = model.generate(ids, do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
    assert torch.equal(greedy_generate(head, spans, ids, 10), expected)


def test_batched_generation_matches_transformers(setup, greedy_generate):
    path, model, head = setup
    ids = input_ids(3, 6, seed=4)
    spans = [load_span(path, 0, 4)]
    with torch.no_grad():
        expected = model.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert torch.equal(greedy_generate(head, spans, ids, 6), expected)


def test_prompts_are_added_before_each_block(kind, tiny_paths):
    path = tiny_paths[kind]
    span = load_span(path, 1, 3)
    single = [load_span(path, 1, 2), load_span(path, 2, 3)]
    hidden = torch.randn(2, 7, 64)
    prompts = torch.randn(2, 2, 3, 64) * 0.5
    expected = hidden
    for index, block in enumerate(single):
        expected = expected.clone()
        expected[:, :3] += prompts[index]
        expected = block(expected)
    close(span(hidden, prompts=prompts), expected)
    close(span(hidden, prompts=torch.zeros(2, 1, 3, 64)), span(hidden))
    # prompt rows beyond the step's tokens are ignored
    long_prompts = torch.randn(2, 2, 20, 64)
    close(span(hidden, prompts=long_prompts), span(hidden, prompts=long_prompts[:, :, :7]))


def test_prompts_with_chunked_prefill_match_one_forward(kind, tiny_paths):
    span = load_span(tiny_paths[kind], 0, 4)
    hidden = torch.randn(1, 9, 64)
    prompts = torch.randn(4, 1, 5, 64) * 0.5
    expected = span(hidden, prompts=prompts)
    cache = span.new_cache(1, 9)
    pieces = [span(hidden[:, a:b], cache=cache, prompts=prompts) for a, b in [(0, 2), (2, 6), (6, 9)]]
    close(torch.cat(pieces, dim=1), expected)


def test_gradients_flow_to_inputs_and_prompts_but_not_weights(kind, tiny_paths):
    span = load_span(tiny_paths[kind], 0, 2)
    assert not any(parameter.requires_grad for parameter in span.parameters())
    hidden = torch.randn(2, 5, 64, requires_grad=True)
    prompts = torch.randn(2, 2, 3, 64, requires_grad=True)
    span(hidden, prompts=prompts).pow(2).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_the_head_is_read_in_out_on_cpu_and_keeps_its_logits(setup):
    """On CPU the LM head's matrix is stored [in, out] (one row times the head streams faster); the module still sees
    an [out, in] weight, logits equal the reference model's, and a tied embedding reads the same memory."""
    path, model, head = setup
    weight = head.lm_head.weight
    assert weight.shape == (model.config.vocab_size, model.config.hidden_size) and weight.t().is_contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        assert head.word_embeddings.weight.data_ptr() == weight.data_ptr()
    ids = input_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
        hidden = model.model(ids).last_hidden_state if hasattr(model, "model") else model.transformer(ids)[0]
        # the reference's last hidden state is already normed: through the head's matrix (and soft-cap) alone
        close(head.soft_cap(head.lm_head(hidden)), expected)
        close(head.word_embeddings(ids[:, -1:]), model.get_input_embeddings().weight[ids[:, -1:]])
