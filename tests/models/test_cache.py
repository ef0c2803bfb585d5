"""SpanCache: sizes for memory budgeting, bounds, rollback, and misuse that must fail without corrupting state."""

from __future__ import annotations

import pytest
import torch

from nectar.models import CacheError, load_span


@pytest.fixture
def span(kind, tiny_paths):
    return load_span(tiny_paths[kind], 0, 2)


def test_cache_size_matches_bytes_per_token(span):
    cache = span.new_cache(3, 20)
    assert (cache.batch_size, cache.max_length, cache.length) == (3, 20, 0)
    assert cache.nbytes == span.cache_bytes_per_token(3) * 20 == span.cache_bytes_per_token() * 3 * 20
    assert cache.dtype == span.dtype and cache.device == span.device


def test_overflow_is_refused_and_leaves_the_cache_usable(span):
    cache = span.new_cache(1, 6)
    hidden = torch.randn(1, 6, 64)
    span(hidden[:, :4], cache=cache)
    with pytest.raises(CacheError, match="at most 6"):
        span(hidden[:, 4:6].repeat(1, 2, 1), cache=cache)
    assert cache.length == 4
    tail = span(hidden[:, 4:6], cache=cache)
    torch.testing.assert_close(tail, span(hidden)[:, 4:6], atol=1e-4, rtol=0)


def test_wrong_batch_or_foreign_cache_is_refused(kind, tiny_paths, span):
    cache = span.new_cache(2, 8)
    with pytest.raises(CacheError, match="batch"):
        span(torch.randn(1, 2, 64), cache=cache)
    other = load_span(tiny_paths[kind], 0, 3)
    with pytest.raises(CacheError, match="not made by this span"):
        other(torch.randn(2, 2, 64), cache=cache)
    assert cache.length == 0


def test_crop_bounds(span):
    cache = span.new_cache(1, 8)
    span(torch.randn(1, 3, 64), cache=cache)
    for bad in (-1, 4):
        with pytest.raises(CacheError, match="crop"):
            cache.crop(bad)
    cache.crop(0)
    assert cache.length == 0


def test_bad_hidden_states_leave_the_cache_untouched(span):
    cache = span.new_cache(1, 8)
    for bad in (torch.randn(1, 3, 63), torch.randn(3, 64), torch.randn(1, 0, 64)):
        with pytest.raises(ValueError, match="hidden_states must be"):
            span(bad, cache=cache)
    with pytest.raises(ValueError, match="prompts must be"):
        span(torch.randn(1, 3, 64), cache=cache, prompts=torch.randn(1, 1, 3, 64))
    assert cache.length == 0


def test_cache_made_under_inference_mode_works_outside_it(span):
    hidden = torch.randn(1, 5, 64)
    with torch.inference_mode():
        cache = span.new_cache(1, 5)
        first = span(hidden[:, :3], cache=cache)
    rest = span(hidden[:, 3:], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), span(hidden), atol=1e-4, rtol=0)


def test_cached_steps_record_no_autograd_graph(span):
    cache = span.new_cache(1, 4)
    output = span(torch.randn(1, 2, 64, requires_grad=True), cache=cache)
    assert not output.requires_grad and not cache.buffer.requires_grad
