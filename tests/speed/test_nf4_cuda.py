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


def test_a_lone_nf4_sessions_recorded_rounds_equal_its_eager_steps(built):
    """nf4 blocks record a lone session's decode rounds as CUDA graphs (bitsandbytes' one-row kernel inside the
    recording); replays equal eager steps over the same codes, as an audit's recomputation expects."""
    from nectar.node.backend import SpanBackend

    def backend(batching: bool) -> SpanBackend:
        return SpanBackend(
            built, 0, 4, dtype=torch.float16, device="cuda", quantization="nf4", show_progress=False, batching=batching
        )

    graphed, plain = backend(True), backend(False)
    decoder = graphed.decode_graphs
    assert decoder is not None and decoder.enabled and decoder.capture and decoder.max_sessions == 1
    generator = torch.Generator().manual_seed(2)
    mine, theirs = graphed.new_caches(0, 4, 1, 48), plain.new_caches(0, 4, 1, 48)
    prompt = torch.randn(1, 5, 256, generator=generator).half()
    graphed.inference_step(prompt, mine, start=0, end=4, position=0)
    plain.inference_step(prompt, theirs, start=0, end=4, position=0)
    worst = 0.0
    for position in range(5, 25):
        x = torch.randn(1, 1, 256, generator=generator).half()
        served = graphed.inference_step(x, mine, start=0, end=4, position=position)
        eager = plain.inference_step(x, theirs, start=0, end=4, position=position)
        worst = max(worst, float((served.float() - eager.float()).abs().max() / eager.float().abs().max()))
    assert decoder.recorded == 1 and decoder.replays == 20, (decoder.recorded, decoder.replays)
    assert worst < 5e-3, worst  # float16 rounding of a masked whole-cache attention against an exact-length one
