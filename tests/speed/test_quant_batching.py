"""Batched rounds through quantized (nf4, int8) Llama blocks: the runner calls the blocks' own quantized linears, and
a round of many sessions equals each session run alone through the generic path (``BlockSpan.forward``, transformers'
layers), which is what a verifier recomputes.

The reference is a backend built with ``batching=False`` over the same quantized weights (the same codes: quantized
on the CPU, or a pre-quantized checkpoint's stored codes).
"""

from __future__ import annotations

import pytest
import torch

from nectar.models.families.llama.batching import LlamaBatchRunner
from nectar.models.tiny import save_prequantized_checkpoint
from nectar.node.backend import SpanBackend
from nectar.node.graphs import GraphedDecoder
from nectar.wire.fingerprints import TOLERANCE_PER_SQRT_BLOCK, output_deviation

TOLERANCE = 1e-5  # float32, as tests/speed


def _backend(path, mode: str, dtype=torch.float32, *, batching: bool, **kwargs) -> SpanBackend:
    return SpanBackend(
        path, 0, 4, dtype=dtype, device="cpu", quantization=mode, show_progress=False, batching=batching, **kwargs
    )


def _rounds_equal_sessions_alone(batched: SpanBackend, plain: SpanBackend, dtype) -> tuple[float, float]:
    """Rounds of 4 sessions (prefills and decodes mixed, then decode rounds) vs each step alone; the worst absolute
    gap, and the worst audit deviation (what a spot check's recomputation through the generic path measures)."""
    hidden = batched.hidden_size
    generator = torch.Generator().manual_seed(0)
    sizes = (1, 2, 1, 1)  # one session of two sequences: its rows stack like any other's
    batched_caches = [batched.new_caches(0, 4, b, 40) for b in sizes]
    plain_caches = [plain.new_caches(0, 4, b, 40) for b in sizes]
    positions = [0] * 4
    rounds = [0]
    run = batched.batch_runner.run

    def counted(tasks, first_block):
        rounds[0] += 1
        assert len(tasks) == 4, "every round goes through the runner whole"
        return run(tasks, first_block)

    batched.batch_runner.run = counted
    worst = deviation = 0.0
    schedule = [(5, 3, 1, 7), (1, 2, 1, 1), (1, 1, 4, 1), (1, 1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1)]
    for tokens in schedule:
        inputs = [torch.randn(b, t, hidden, generator=generator).to(dtype) for b, t in zip(sizes, tokens)]
        tasks = [
            batched.inference_task(x, caches, start=0, end=4, position=p)
            for x, caches, p in zip(inputs, batched_caches, positions)
        ]
        outputs = batched.run_inference(tasks)
        for index, (x, output) in enumerate(zip(inputs, outputs)):
            alone = plain.inference_step(x, plain_caches[index], start=0, end=4, position=positions[index])
            assert output.shape == alone.shape == x.shape and output.dtype == dtype
            worst = max(worst, (output.float() - alone.float()).abs().max().item())
            deviation = max(deviation, output_deviation(output, alone))
            positions[index] += x.shape[1]
    assert rounds[0] == len(schedule)
    return worst, deviation


@pytest.mark.parametrize(("mode", "dtype"), [("nf4", torch.float32), ("int8", torch.float32), ("nf4", torch.bfloat16)])
def test_quantized_rounds_equal_each_session_alone(tiny_llama, mode, dtype):
    batched = _backend(tiny_llama, mode, dtype, batching=True, page_size=16, cache_bytes=1 << 20)
    plain = _backend(tiny_llama, mode, dtype, batching=False)
    runner = batched.batch_runner
    assert isinstance(runner, LlamaBatchRunner) and runner.quantization == mode
    # the routes that read float matrices stay off: C layer, compiled route, page pool; and rounds of several
    # sessions are never recorded (nf4 records a lone session's: the last test here)
    assert runner.native is None and not runner.compiled and runner.static_max_rows == 1
    assert (runner.static_positions > 0) == (mode == "nf4")
    assert batched.pages is None and batched.paged is None
    assert all(layer.quantized and layer.qkv_weight is None for layer in runner.layers)
    worst, deviation = _rounds_equal_sessions_alone(batched, plain, dtype)
    # a spot check of any batched step passes: within the audits' tolerance for 4 blocks in this dtype
    assert deviation <= TOLERANCE_PER_SQRT_BLOCK[str(dtype).removeprefix("torch.")] * 2, deviation
    if dtype == torch.float32:
        assert worst <= TOLERANCE, worst


def test_quantized_runner_calls_the_stored_codes_untouched(tiny_llama):
    """No fused or re-quantized copy: the runner's products are the blocks' own modules, codes unchanged."""
    reference = _backend(tiny_llama, "nf4", batching=False)
    batched = _backend(tiny_llama, "nf4", batching=True)
    for ours, theirs, layer in zip(batched.blocks, reference.blocks, batched.batch_runner.layers):
        attention = ours.blocks[0].self_attn
        assert layer.qkv_linears == (attention.q_proj, attention.k_proj, attention.v_proj)
        assert layer.down_proj is ours.blocks[0].mlp.down_proj
        for (name, mine), (_, stored) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(mine, stored), name


def test_prequantized_checkpoint_batches(tiny_llama, tmp_path):
    stored = save_prequantized_checkpoint(tmp_path / "nf4", tiny_llama, "nf4")
    batched, plain = _backend(stored, "nf4", batching=True), _backend(stored, "nf4", batching=False)
    assert batched.batch_runner is not None
    assert _rounds_equal_sessions_alone(batched, plain, torch.float32)[0] <= TOLERANCE


def test_float_runner_keeps_its_fused_routes(tiny_llama):
    runner = _backend(tiny_llama, "none", batching=True).batch_runner
    assert not runner.quantized and runner.static_positions > 0 and runner.pages
    assert all(layer.qkv_weight is not None and not layer.quantized for layer in runner.layers)


def test_a_lone_nf4_session_replays_its_recording_and_rounds_of_several_stay_eager(tiny_llama):
    """A lone nf4 session's decode rounds go through the recorded-round path (here run eagerly: ``capture=False``;
    tests/speed/test_nf4_cuda.py records them on a GPU) and equal its eager steps. On a CPU node a round of two
    sessions is not recorded (no shared scratch there: each product would dequantize its matrix inside the
    recording); GPU nodes record those too (test_nf4_cuda.py)."""
    batched = _backend(tiny_llama, "nf4", batching=True)
    plain = _backend(tiny_llama, "nf4", batching=False)
    static = batched.decode_graphs = GraphedDecoder(batched.batch_runner, capture=False)
    assert static.enabled and static.max_sessions == 1
    hidden, generator = batched.hidden_size, torch.Generator().manual_seed(1)
    caches = [(batched.new_caches(0, 4, 1, 40), plain.new_caches(0, 4, 1, 40)) for _ in range(2)]
    for mine, theirs in caches:
        prompt = torch.randn(1, 3, hidden, generator=generator)
        batched.inference_step(prompt, mine, start=0, end=4, position=0)
        plain.inference_step(prompt, theirs, start=0, end=4, position=0)
    worst, position = 0.0, 3
    for _ in range(4):
        xs = [torch.randn(1, 1, hidden, generator=generator) for _ in caches]
        tasks = [batched.inference_task(x, mine, start=0, end=4, position=position) for x, (mine, _) in zip(xs, caches)]
        assert not static.applies(tasks)  # two sessions: eager
        outputs = batched.run_inference(tasks)
        alone = batched.inference_task(xs[0] * 0.5, caches[0][0], start=0, end=4, position=position + 1)
        outputs.append(batched.run_inference([alone])[0])  # the first session alone: its recording
        expected = [
            plain.inference_step(x, theirs, start=0, end=4, position=position) for x, (_, theirs) in zip(xs, caches)
        ]
        expected.append(plain.inference_step(xs[0] * 0.5, caches[0][1], start=0, end=4, position=position + 1))
        for output, reference in zip(outputs, expected):
            worst = max(worst, (output - reference).abs().max().item())
        position += 2
        for mine, theirs in caches[1:]:  # the second session skipped a step: keep it level with a step of its own
            x = torch.randn(1, 1, hidden, generator=generator)
            batched.inference_step(x, mine, start=0, end=4, position=position - 1)
            plain.inference_step(x, theirs, start=0, end=4, position=position - 1)
    # one recording per session (each one's lone steps), replayed by every lone step; the rounds of two ran eagerly
    assert static.recorded == 2 and static.replays == 8, (static.recorded, static.replays)
    assert worst <= TOLERANCE, worst
