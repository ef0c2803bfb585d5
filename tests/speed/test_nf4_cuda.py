"""Pre-quantized nf4 checkpoints on a GPU (issue 25, point 5): the builder's GPU path (benchmarks/prequantized.py, as
the 70B run uses it) writes codes that a CUDA node and a CPU verifier read as the same model, and that transformers +
bitsandbytes on the GPU compute alike. Needs a CUDA device: run on the device machine (skipped elsewhere)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from nectar.models import load_span

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from prequantized import build_nf4_checkpoint
    finally:
        sys.path.remove(str(BENCHMARKS))
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return build_nf4_checkpoint(tmp_path_factory.mktemp("nf4") / "gpu-built", config, device="cuda")


def test_a_cuda_node_and_a_cpu_verifier_read_the_same_gpu_built_codes(built):
    node = load_span(built, 0, 4, dtype=torch.float16, device="cuda", quantization="nf4")
    verifier = load_span(built, 0, 4, dtype=torch.float32, quantization="nf4")
    x = torch.randn(2, 7, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        served, recomputed = node(x).float().cpu(), verifier(x)
    deviation = float((served - recomputed).abs().mean() / recomputed.abs().mean())
    assert deviation < 0.01, deviation  # float16 rounding only; other codes would differ by tens of percent


def test_transformers_on_the_gpu_computes_the_built_checkpoint_as_nectar_does(built):
    reference = AutoModelForCausalLM.from_pretrained(str(built), dtype=torch.float16, device_map="cuda")
    span = load_span(built, 0, 3, dtype=torch.float16, device="cuda", quantization="nf4")
    with torch.no_grad():
        hidden = reference(torch.tensor([[5, 6, 7, 8, 9]], device="cuda"), output_hidden_states=True).hidden_states
        output = span(hidden[0])
    assert torch.allclose(output.float(), hidden[3].float(), rtol=0.01, atol=0.01)  # hidden[4]: after the final norm


def test_nf4_sessions_recorded_rounds_equal_their_eager_steps(built):
    """nf4 blocks on a GPU record decode rounds of several sessions as CUDA graphs (products that bitsandbytes
    computes by dequantizing go through the span's one scratch matrix: the next test). Replays equal eager steps
    over the same codes, as an audit's recomputation expects."""
    from nectar.node.backend import SpanBackend

    def backend(batching: bool) -> SpanBackend:
        return SpanBackend(
            built, 0, 4, dtype=torch.float16, device="cuda", quantization="nf4", show_progress=False, batching=batching
        )

    graphed, plain = backend(True), backend(False)
    decoder = graphed.decode_graphs
    assert graphed.batch_runner.scratch is not None
    assert decoder is not None and decoder.enabled and decoder.capture and decoder.max_sessions > 1
    generator = torch.Generator().manual_seed(2)
    for count in (1, 6):  # one session (bitsandbytes' one-row kernel), then six
        sessions = []
        for prefill in range(3, 3 + count):
            mine, theirs = graphed.new_caches(0, 4, 1, 48), plain.new_caches(0, 4, 1, 48)
            prompt = torch.randn(1, prefill, 256, generator=generator).half()
            graphed.inference_step(prompt, mine, start=0, end=4, position=0)
            plain.inference_step(prompt, theirs, start=0, end=4, position=0)
            sessions.append([mine, theirs, prefill])
        replays, worst = decoder.replays, 0.0
        for _ in range(20):
            xs = [torch.randn(1, 1, 256, generator=generator).half() for _ in sessions]
            tasks = [
                graphed.inference_task(x, mine, start=0, end=4, position=p) for x, (mine, _, p) in zip(xs, sessions)
            ]
            served = graphed.run_inference(tasks)
            for x, out, session in zip(xs, served, sessions):
                eager = plain.inference_step(x, session[1], start=0, end=4, position=session[2])
                worst = max(worst, float((out.float() - eager.float()).abs().max() / eager.float().abs().max()))
                session[2] += 1
        assert decoder.replays - replays == 20, (count, decoder.recorded, decoder.replays)
        assert worst < 5e-3, (count, worst)  # float16 rounding of a masked whole-cache attention vs an exact one


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_products_through_the_scratch_are_bitsandbytes_own(dtype):
    """``NF4Rows`` computes bitsandbytes' own products bit for bit, with the kernel bitsandbytes chooses: its fused
    kernel up to ``FUSED_ROWS`` rows and where its dispatch fuses more, else its dequantize-then-linear, the float
    matrix in the shared scratch."""
    from nectar.models.quant import FUSED_ROWS, NF4Rows, NF4Scratch, _nf4_linear

    generator = torch.Generator().manual_seed(0)
    layers = []
    for in_features, out_features in [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 1024)]:
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
        layers.append(_nf4_linear(linear.cuda(), dtype))
    scratch = NF4Scratch(layers, dtype, torch.device("cuda"))
    assert scratch.weight.numel() == 4096 * 11008
    through_scratch = 0
    for layer in layers:
        product = NF4Rows(layer, scratch)
        weight = bnb_weight(layer).to(dtype)
        for rows in (1, FUSED_ROWS, FUSED_ROWS + 1, 16, 64):
            x = torch.randn(rows, layer.in_features, generator=generator).to("cuda", dtype)
            before = product.through_scratch
            with torch.inference_mode():
                mine, theirs = product(x), layer(x)
            assert torch.equal(mine, theirs), (layer, rows)  # whichever kernel bitsandbytes chose
            if product.through_scratch > before:
                through_scratch += 1
                assert rows > FUSED_ROWS
                assert torch.equal(mine, torch.nn.functional.linear(x, weight))
    assert through_scratch  # bitsandbytes dequantizes some of them (a 4096x4096 matrix at 64 rows, on an H100)


def test_products_through_the_scratch_record_as_cuda_graphs():
    """A recording that holds a product bitsandbytes computes by dequantizing (a 4096x4096 matrix at more than 512
    rows, on every GPU bitsandbytes 0.50 calibrates) replays it through the shared scratch: the recording's pool keeps
    no float copy of the matrix, and replays equal eager products on new inputs, beside a product of bitsandbytes'
    fused kernel in the same recording."""
    from nectar.models.quant import FUSED_ROWS, NF4Rows, NF4Scratch, _nf4_linear

    generator = torch.Generator().manual_seed(1)
    layers = []
    for in_features, out_features in [(4096, 4096), (4096, 11008)]:
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
        layers.append(_nf4_linear(linear.cuda(), torch.float16))
    scratch = NF4Scratch(layers, torch.float16, torch.device("cuda"))
    square, wide = (NF4Rows(layer, scratch) for layer in layers)
    many = torch.randn(520, 4096, generator=generator).to("cuda", torch.float16)
    few = torch.randn(FUSED_ROWS, 4096, generator=generator).to("cuda", torch.float16)
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            square(many), wide(few)  # warm-up: kernel choice, lazy state
        torch.cuda.current_stream().wait_stream(stream)
        assert square.through_scratch == 1 and wide.through_scratch == 0
        torch.cuda.synchronize()
        reserved = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = square(many), wide(few)
        kept = torch.cuda.memory_reserved() - reserved  # the recording's private pool
        assert kept < 4096 * 4096 * 2, kept  # its outputs' segments only: no float16 copy of the 32 MB matrix
        for _ in range(3):
            xs = [torch.randn(*t.shape, generator=generator).to("cuda", torch.float16) for t in (many, few)]
            many.copy_(xs[0]), few.copy_(xs[1])
            graph.replay()
            for output, layer, x in zip(outputs, layers, xs):
                eager = layer(x)
                assert (output.float() - eager.float()).abs().max() <= 8 * torch.finfo(x.dtype).eps * eager.abs().max()


def bnb_weight(layer) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
