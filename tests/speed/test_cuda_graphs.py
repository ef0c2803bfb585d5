"""Recorded CUDA-graph decode rounds on a real GPU equal eager one-by-one steps (node/graphs.py over
models/families/llama/graphs.py).

Needs a CUDA device: run on the `device` machine (benchmarks/gpu/run_gpu.sh runs it before the benchmark). On a CPU
the same rounds are checked with graphs run eagerly (test_batched_compute.py).
"""

from __future__ import annotations

import pytest
import torch

from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.backend import SpanBackend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")


def _backend(path: str, *, batching: bool) -> SpanBackend:
    return SpanBackend(path, 0, 4, dtype=torch.float32, device="cuda", show_progress=False, batching=batching)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> dict[str, str]:
    """Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms): their blocks take the fused routes too."""
    root = tmp_path_factory.mktemp("graphs")
    return {kind: str(save_tiny_checkpoint(root / kind, kind, seed=3)) for kind in ("qwen2", "qwen3")}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("max_lengths", [(40, 24, 31), (40, 40, 40)], ids=["own-caches", "pooled-caches"])
def test_graph_rounds_on_the_gpu_equal_eager_steps(tiny_llama, tiny_qwen, kind, max_lengths):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_llama if kind == "llama" else tiny_qwen[kind]
    graphed, plain = _backend(path, batching=True), _backend(path, batching=False)
    decoder = graphed.decode_graphs
    assert decoder is not None and decoder.capture
    torch.manual_seed(0)
    hidden = graphed.hidden_size
    sessions = []
    for max_length, prefill in zip(max_lengths, (5, 3, 7)):
        caches = (graphed.new_caches(0, 4, 1, max_length), plain.new_caches(0, 4, 1, max_length))
        x = torch.randn(1, prefill, hidden)
        graphed.inference_step(x, caches[0], start=0, end=4, position=0)
        plain.inference_step(x, caches[1], start=0, end=4, position=0)
        sessions.append([caches, prefill])
    worst = 0.0
    for step in range(10):
        for group in (sessions, sessions[:1]):  # a round of three, then one session alone
            xs = [torch.randn(1, 1, hidden) for _ in group]
            tasks = [
                graphed.inference_task(x, caches[0], start=0, end=4, position=position)
                for x, (caches, position) in zip(xs, group)
            ]
            outputs = graphed.run_inference(tasks)
            for x, output, session in zip(xs, outputs, group):
                expected = plain.inference_step(x, session[0][1], start=0, end=4, position=session[1])
                worst = max(worst, (output - expected).abs().max().item())
                session[1] += 1
    # the three's first round recorded them; the lone session's rounds replay that recording
    assert decoder.recorded == 1 and decoder.replays == 2 * 10
    pooled = next(iter(decoder._graphs.values())).pools is not None  # equal cache sizes: one tensor per block
    assert pooled == (len(set(max_lengths)) == 1)
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_paged_rounds_record_once_and_replay_for_changing_sessions(tiny_llama, tiny_qwen, kind):
    """The page pool's rounds (``PagedDecoder``): one recording per row bucket (pages of 64 tokens: one table width
    here) serves every mix of sessions, arriving and leaving, and equals eager one-by-one steps."""
    import gc

    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_llama if kind == "llama" else tiny_qwen[kind]
    paged = SpanBackend(
        path, 0, 4, dtype=torch.float32, device="cuda", show_progress=False, page_size=64, cache_bytes=2**24
    )
    plain = _backend(path, batching=False)
    decoder = paged.paged
    assert decoder is not None and decoder.capture
    torch.manual_seed(0)
    hidden = paged.hidden_size
    sessions: dict[int, list] = {}

    def open_session(name: int, prefill: int) -> None:
        caches = (paged.new_caches(0, 4, 1, 48), plain.new_caches(0, 4, 1, 48))
        x = torch.randn(1, prefill, hidden)
        paged.inference_step(x, caches[0], start=0, end=4, position=0)
        plain.inference_step(x, caches[1], start=0, end=4, position=0)
        sessions[name] = [caches, prefill]

    for name, prefill in enumerate((5, 3, 7, 2)):
        open_session(name, prefill)
    worst = 0.0
    for step in range(12):
        if step % 3 == 2:  # one leaves, another arrives: the pool reuses its pages
            del sessions[min(sessions)]
            gc.collect()
            open_session(max(sessions) + 1, 2 + step % 5)
        names = sorted(sessions)
        for group in (names, names[1:], names[:1]):  # 4 rows, 3 (bucket 4) and 1
            xs = [torch.randn(1, 1, hidden) for _ in group]
            tasks = [
                paged.inference_task(x, sessions[n][0][0], start=0, end=4, position=sessions[n][1])
                for x, n in zip(xs, group)
            ]
            outputs = paged.run_inference(tasks)
            for x, output, n in zip(xs, outputs, group):
                expected = plain.inference_step(x, sessions[n][0][1], start=0, end=4, position=sessions[n][1])
                worst = max(worst, (output - expected).abs().max().item())
                sessions[n][1] += 1
    assert decoder.recorded == 2 and decoder.replays == 3 * 12  # buckets 4 and 1, whichever sessions
    assert worst <= 1e-4, worst
