"""Which path each Llama-shaped family's blocks take on a node, and that it computes them exactly.

Qwen2's q/k/v biases and Qwen3's per-head q/k norms are in the fused kernels: their blocks take the batched route
(Qwen2 also the C decode layer, which has no per-head norms), and equal transformers' own layers (a backend with
``batching=False``) to float32 rounding. Mixtral's experts and Mistral's window are not: those blocks take the
generic path, and the node logs why.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from nectar.models import load_span
from nectar.models.families.llama.batching import LlamaBatchRunner
from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.backend import SpanBackend
from nectar.node.graphs import GraphedDecoder

TOLERANCE = 1e-5  # float32; a dropped bias gives differences of order 0.1


def _backend(path: str, *, batching: bool) -> SpanBackend:
    return SpanBackend(path, 0, 4, dtype=torch.float32, device="cpu", show_progress=False, batching=batching)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    kinds = ("qwen2", "qwen3", "mixtral", "mistral")
    return {kind: str(save_tiny_checkpoint(root / kind, kind, seed=3)) for kind in kinds}


def _worst_round(
    fast: SpanBackend, plain: SpanBackend, schedule: list[tuple[int, ...]], max_lengths: tuple[int, ...] | None = None
) -> float:
    """Sessions of batch 1 stepping together (``schedule``: each round's new tokens per session) through ``fast``'s
    ``run_inference`` and one by one through ``plain``; the largest difference."""
    hidden, sessions, worst = fast.hidden_size, len(schedule[0]), 0.0
    max_lengths = max_lengths or (32,) * sessions
    fast_caches = [fast.new_caches(0, 4, 1, length) for length in max_lengths]
    plain_caches = [plain.new_caches(0, 4, 1, length) for length in max_lengths]
    positions = [0] * sessions
    for tokens in schedule:
        inputs = [torch.randn(1, count, hidden) for count in tokens]
        tasks = [
            fast.inference_task(x, caches, start=0, end=4, position=position)
            for x, caches, position in zip(inputs, fast_caches, positions)
        ]
        for index, output in enumerate(fast.run_inference(tasks)):
            expected = plain.inference_step(
                inputs[index], plain_caches[index], start=0, end=4, position=positions[index]
            )
            worst = max(worst, (output - expected).abs().max().item())
            positions[index] += tokens[index]
    return worst


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_blocks_take_the_fused_batched_path_exactly(checkpoints, caplog, kind):
    with caplog.at_level(logging.INFO, logger="nectar.node.backend"):
        fast = _backend(checkpoints[kind], batching=True)
    plain = _backend(checkpoints[kind], batching=False)
    assert isinstance(fast.batch_runner, LlamaBatchRunner)
    layer = fast.batch_runner.layers[0]
    if kind == "qwen2":
        assert layer.qkv_bias is not None  # the biases ride in the fused projection
    else:
        assert layer.q_norm is not None and layer.k_norm is not None  # per-head norms before RoPE
    assert f"Inference steps of {kind} blocks: batched Llama runner" in caplog.text
    torch.manual_seed(0)
    # prefills and decodes mixed in one forward, then decode rounds of three sessions (one padded attention)
    assert _worst_round(fast, plain, [(5, 3, 1), (1, 2, 1), (1, 1, 1), (1, 1, 1)]) <= TOLERANCE


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_graph_safe_decode_rounds_equal_one_by_one_steps(checkpoints, kind):
    """The decode step a GPU node records as a CUDA graph (``static_step``), run eagerly on the CPU, with the biases
    and per-head norms: rounds of three sessions (own caches, then pooled ones) equal unbatched steps."""
    fast, plain = _backend(checkpoints[kind], batching=True), _backend(checkpoints[kind], batching=False)
    for max_length in (None, 32):
        graphs = fast.decode_graphs = GraphedDecoder(fast.batch_runner, capture=False)
        torch.manual_seed(5)
        # prefills of 5, 3 and 7 tokens, then decode rounds of all three (different cache sizes: own caches)
        lengths = (40, 24, 31) if max_length is None else (max_length,) * 3
        schedule = [(5, 3, 7)] + [(1, 1, 1)] * 4
        assert _worst_round(fast, plain, schedule, max_lengths=lengths) <= TOLERANCE
        assert graphs.replays == 4 and graphs.recorded == 1  # every decode round went through the static step
        assert (next(iter(graphs._graphs.values())).pools is not None) == (max_length is not None)


def test_qwen2_single_session_decode_through_the_c_layer(checkpoints, monkeypatch):
    monkeypatch.setenv("NECTAR_NATIVE_DECODE", "on")
    fast, plain = _backend(checkpoints["qwen2"], batching=True), _backend(checkpoints["qwen2"], batching=False)
    decoder = fast.batch_runner.native
    assert decoder is not None
    calls, run = [], decoder.run
    decoder.run = lambda task, first_block: calls.append(task.caches[0].length) or run(task, first_block)
    torch.manual_seed(1)
    assert _worst_round(fast, plain, [(4,)] + [(1,)] * 6) <= TOLERANCE
    assert calls == list(range(4, 10))  # every single-token step went through the C layer


def test_qwen3_decode_stays_in_pytorch(checkpoints, monkeypatch):
    """The C layer has no per-head norms: even when asked for, Qwen3 blocks keep the PyTorch decode step."""
    monkeypatch.setenv("NECTAR_NATIVE_DECODE", "on")
    fast = _backend(checkpoints["qwen3"], batching=True)
    assert fast.batch_runner is not None and fast.batch_runner.native is None
    assert "through PyTorch" in fast.batch_runner.describe()
    torch.manual_seed(1)
    assert _worst_round(fast, _backend(checkpoints["qwen3"], batching=False), [(4,)] + [(1,)] * 4) <= TOLERANCE


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("mixtral", "the mixture-of-experts MLP is not in the fused kernels"),
        ("mistral", "sliding-window attention is not in the fused kernels"),
    ],
)
def test_blocks_the_kernels_lack_take_the_generic_path_and_the_node_says_why(checkpoints, caplog, kind, reason):
    with caplog.at_level(logging.INFO, logger="nectar.node.backend"):
        backend = _backend(checkpoints[kind], batching=True)
    assert backend.batch_runner is None
    assert f"Inference steps of {kind} blocks: generic path, one session at a time" in caplog.text
    assert f"({reason})" in caplog.text
    torch.manual_seed(2)
    # rounds of two sessions still give each its own output (past Mistral's window of 6)
    assert _worst_round(backend, _backend(checkpoints[kind], batching=False), [(8, 3), (1, 1), (1, 5)]) <= TOLERANCE


def test_a_block_with_parts_the_kernels_lack_is_refused(checkpoints):
    """The fused kernels compute a fixed set of parts: a Llama-shaped block with one more (e.g. Gemma 2's norm
    around the MLP) is refused rather than computed without it."""
    spans = [load_span(checkpoints["qwen2"], index, index + 1) for index in range(2)]
    assert LlamaBatchRunner.unsupported(spans) is None
    block = spans[1].blocks[0]
    block.pre_feedforward_layernorm = copy.deepcopy(block.input_layernorm)
    assert "parts the fused kernels do not compute" in LlamaBatchRunner.unsupported(spans)
