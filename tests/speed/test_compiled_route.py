"""The compiled decode route (``NECTAR_DECODE_ROUTE=compiled``) through the node's recorded-round path, on a CPU.

The route is forced on CPU blocks and compiled with dynamo's eager backend: graph capture and guards work as on a
GPU, without an Inductor build. Rounds run the recorded-round code eagerly (``GraphedDecoder(capture=False)``), so
the same functions run under the same inference mode as a node's rounds. On a GPU the route's kernels are checked by
benchmarks/gpu/decode_profile.py (its outputs against the eager route's).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from nectar.models.families.llama import graphs
from nectar.node.backend import SpanBackend
from nectar.node.graphs import GraphedDecoder


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: original(fn, backend="eager", **kwargs))
    monkeypatch.setattr(graphs, "compiles", lambda blocks: True)
    monkeypatch.setattr(graphs, "_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _backend(path: str, *, batching: bool, dtype: torch.dtype = torch.float32) -> SpanBackend:
    return SpanBackend(path, 0, 4, dtype=dtype, device="cpu", show_progress=False, batching=batching)


def test_compiled_rounds_compile_only_at_load_and_equal_plain_steps(tiny_llama, compiled_on_cpu):
    compiled, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    assert compiled.batch_runner.compiled
    compiled.decode_graphs = GraphedDecoder(compiled.batch_runner, capture=False)
    at_load = counters["stats"]["unique_graphs"]
    assert at_load >= 2  # the load compiled the route's functions
    torch.manual_seed(0)
    hidden = compiled.hidden_size
    sessions = []
    for prefill in range(3, 19):  # 16 sessions, equal caches: the pooled round of the 16-session benchmark
        caches = (compiled.new_caches(0, 4, 1, 40), plain.new_caches(0, 4, 1, 40))
        x = torch.randn(1, prefill, hidden)
        compiled.inference_step(x, caches[0], start=0, end=4, position=0)
        plain.inference_step(x, caches[1], start=0, end=4, position=0)
        sessions.append([caches, prefill])
    lone = (compiled.new_caches(0, 4, 1, 24), plain.new_caches(0, 4, 1, 24))  # only ever in rounds of its own
    x = torch.randn(1, 2, hidden)
    compiled.inference_step(x, lone[0], start=0, end=4, position=0)
    plain.inference_step(x, lone[1], start=0, end=4, position=0)
    worst = 0.0
    for step in range(4):
        # every session, one of them, a few (replays of the round of 16), the lone session (the one-row variant)
        for group in (sessions, sessions[:1], sessions[:5], [[lone, 2 + step]]):
            xs = [torch.randn(1, 1, hidden) for _ in group]
            tasks = [
                compiled.inference_task(x, caches[0], start=0, end=4, position=position)
                for x, (caches, position) in zip(xs, group)
            ]
            for x, output, session in zip(xs, compiled.run_inference(tasks), group):
                expected = plain.inference_step(x, session[0][1], start=0, end=4, position=session[1])
                worst = max(worst, (output - expected).abs().max().item())
                session[1] += 1
    assert compiled.decode_graphs.replays >= 16  # the rounds took the recorded-round route
    # before the warm-up ran under inference mode, each variant compiled again in its first round
    assert counters["stats"]["unique_graphs"] == at_load
    assert worst < 1e-4


@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU code needs a C++ compiler")
def test_compiled_functions_round_as_the_eager_route_bit_for_bit(tiny_llama):
    """Inductor's kernels (its CPU code here; Triton's on GPUs) with ``graphs.rounding_options()``: each block's
    pre-attention (norm, products, RoPE) and post-attention (products, residuals, norm, SwiGLU) outputs equal the eager
    fused route's, bit for bit, in bfloat16. Without the options most values differ (fused float32 intermediates,
    products fused with their residual add)."""
    backend = _backend(tiny_llama, batching=True, dtype=torch.bfloat16)
    blocks, layer = backend.batch_runner, backend.batch_runner.layers[1]
    heads, kv_heads = blocks.num_heads, blocks.num_kv_heads
    options = graphs.rounding_options()
    pre = torch.compile(graphs._pre_attention, fullgraph=True, dynamic=False, options=options)
    post = torch.compile(graphs._post_attention, fullgraph=True, dynamic=False, options=options)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, blocks.hidden_size, generator=generator).mul(3).to(torch.bfloat16)
    attention = torch.randn(3, heads * blocks.head_dim, generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        cos, sin = blocks.rotary_at(x, torch.tensor([2, 9, 30]), 31)
        compiled_qkv = pre(
            x, layer.input_norm.weight, layer.qkv_weight, cos, sin, heads, kv_heads, layer.input_norm.eps
        )
        compiled_out = post(
            x, attention, layer.o_weight, layer.post_norm.weight, layer.gate_up_weight, layer.down_weight,
            layer.post_norm.eps,
        )  # fmt: skip
        assert torch.equal(compiled_qkv, blocks.qkv(layer, x, cos, sin))
        assert torch.equal(compiled_out, blocks.mlp(layer, x.clone(), attention))
