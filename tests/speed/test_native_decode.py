"""One session's decode step in C (models/families/llama/native_decode.py) equals transformers' decoder layers, and
is used only where it applies.

The reference is a backend built with ``batching=False``: transformers' own layers with untouched weights.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.models import native
from nectar.models.errors import CacheError
from nectar.models.tiny import tiny_config
from nectar.node.backend import SpanBackend

TOLERANCE = 1e-5  # float32; a wrong rotation, head mapping or cache slot gives differences of order 1


def _backend(path: str, *, batching: bool = True) -> SpanBackend:
    return SpanBackend(path, 0, 4, dtype=torch.float32, device="cpu", show_progress=False, batching=batching)


def _count_native_steps(backend: SpanBackend) -> list:
    """Spies on the C layer: each call appends the session's cache length."""
    decoder = backend.batch_runner.native
    assert decoder is not None
    calls, run = [], decoder.run

    def counted(task, first_block):
        calls.append(task.caches[0].length)
        return run(task, first_block)

    decoder.run = counted
    return calls


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory) -> str:
    """Random biases on every projection, and grouped-query attention: every argument of the C layer is used."""
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", attention_bias=True, mlp_bias=True), dtype=torch.float32
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.bias"):
                parameter.normal_(std=0.1)  # transformers initialises biases to zero
    path = tmp_path_factory.mktemp("native") / "biased"
    model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("checkpoint", ["tiny_llama", "biased_llama"])
def test_c_layer_steps_equal_transformers_layers_through_decode_and_replay(checkpoint, request, monkeypatch):
    monkeypatch.setenv("NECTAR_NATIVE_DECODE", "on")
    path = request.getfixturevalue(checkpoint)
    fast, plain = _backend(path), _backend(path, batching=False)
    calls = _count_native_steps(fast)
    hidden = fast.hidden_size
    fast_caches, plain_caches = fast.new_caches(0, 4, 1, 32), plain.new_caches(0, 4, 1, 32)
    torch.manual_seed(0)
    # a prefill (the PyTorch path), single-token steps (the C layer), then a replay from position 3
    steps = [(0, 5)] + [(position, 1) for position in range(5, 17)] + [(3, 1), (4, 1), (5, 2), (7, 1)]
    worst = 0.0
    for position, tokens in steps:
        step = torch.randn(1, tokens, hidden)
        kept = step.clone()
        out = fast.inference_step(step, fast_caches, start=0, end=4, position=position)
        expected = plain.inference_step(step, plain_caches, start=0, end=4, position=position)
        assert torch.equal(step, kept), "the C layer works on a copy: the step's input (audited) stays as it was"
        assert out.shape == expected.shape == step.shape
        worst = max(worst, (out - expected).abs().max().item())
        assert fast_caches[0].length == plain_caches[0].length == position + tokens
    assert worst <= TOLERANCE, worst
    assert calls == list(range(5, 17)) + [3, 4, 7]  # single-token steps only, at the cache lengths they started from
    for block in range(4):  # the caches hold the same keys and values
        torch.testing.assert_close(fast_caches[block].keys(0), plain_caches[block].keys(0), rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(fast_caches[block].values(0), plain_caches[block].values(0), rtol=0, atol=TOLERANCE)


def test_only_one_sessions_single_token_steps_take_the_c_layer(tiny_llama, monkeypatch):
    monkeypatch.setenv("NECTAR_NATIVE_DECODE", "on")
    fast, plain = _backend(tiny_llama), _backend(tiny_llama, batching=False)
    calls = _count_native_steps(fast)
    hidden = fast.hidden_size
    a, b = fast.new_caches(0, 4, 1, 16), fast.new_caches(0, 4, 1, 16)
    pair = fast.new_caches(0, 4, 2, 16)
    fast.run_inference(
        [fast.inference_task(torch.randn(1, 1, hidden), caches, start=0, end=4, position=0) for caches in (a, b)]
    )  # two sessions in one round
    fast.inference_step(torch.randn(2, 1, hidden), pair, start=0, end=4, position=0)  # two sequences
    assert calls == [] and a[0].length == b[0].length == pair[0].length == 1
    # a sub-span of the node's blocks: the C layer runs blocks 1 and 2 with their own weights
    sub, plain_sub = fast.new_caches(1, 3, 1, 16), plain.new_caches(1, 3, 1, 16)
    for position in range(3):
        step = torch.randn(1, 1, hidden)
        out = fast.inference_step(step, sub, start=1, end=3, position=position)
        expected = plain.inference_step(step, plain_sub, start=1, end=3, position=position)
        torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE)
    assert calls == [0, 1, 2]


def test_a_step_past_max_length_changes_no_cache(tiny_llama, monkeypatch):
    monkeypatch.setenv("NECTAR_NATIVE_DECODE", "on")
    fast = _backend(tiny_llama)
    calls = _count_native_steps(fast)
    caches = fast.new_caches(0, 4, 1, 3)
    for position in range(3):
        fast.inference_step(torch.randn(1, 1, fast.hidden_size), caches, start=0, end=4, position=position)
    before = [cache.buffer.clone() for cache in caches]
    with pytest.raises(CacheError, match="holds 3"):
        fast.inference_step(torch.randn(1, 1, fast.hidden_size), caches, start=0, end=4, position=3)
    assert calls == [0, 1, 2] and all(cache.length == 3 for cache in caches)
    assert all(torch.equal(cache.buffer, saved) for cache, saved in zip(caches, before))


def test_the_c_layer_is_timed_at_load_and_can_be_turned_off(tiny_llama, monkeypatch, caplog):
    monkeypatch.delenv("NECTAR_NATIVE_DECODE", raising=False)
    with caplog.at_level(logging.INFO, logger="nectar.models.families.llama.native_decode"):
        _backend(tiny_llama)
    assert "One session's decode step through 4 blocks: C layer" in caplog.text and " chosen" in caplog.text
    monkeypatch.setenv("NECTAR_NATIVE_DECODE", "off")
    assert _backend(tiny_llama).batch_runner.native is None
    monkeypatch.setenv("NECTAR_NATIVE_DECODE", "fast")
    with pytest.raises(ValueError, match="NECTAR_NATIVE_DECODE must be auto, on or off"):
        _backend(tiny_llama)
    monkeypatch.setenv("NECTAR_NATIVE_DECODE", "on")
    monkeypatch.setenv("NECTAR_NATIVE", "off")  # no C kernels at all: PyTorch computes
    native.load.cache_clear()
    try:
        assert _backend(tiny_llama).batch_runner.native is None
    finally:
        native.load.cache_clear()
