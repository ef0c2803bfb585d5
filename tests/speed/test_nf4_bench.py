"""The 70B run's pieces at a tiny shape on the CPU (issue 25, point 5): benchmarks/prequantized.py writes a checkpoint
that transformers + bitsandbytes and Nectar both read as the same nf4 model, and bench_gpu.py --quant nf4 runs end to
end through a 2-node swarm (the figures are the GPU run's job, benchmarks/gpu/run_70b.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from nectar.models import load_span
from nectar.models.resolve import load_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def prequantized():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import prequantized

        yield prequantized
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_built_checkpoint_is_the_same_nf4_model_for_transformers_and_nectar(prequantized, tmp_path):
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    path = prequantized.build_nf4_checkpoint(tmp_path / "nf4", config, shard_bytes=100_000)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1 and not (tmp_path / "nf4.tmp").exists()
    assert load_tokenizer(path)("w5 w6")["input_ids"][-2:] == [5, 6]
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float16, device_map="cpu")
    assert type(reference.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        hidden = reference(torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True).hidden_states
        span = load_span(path, 0, 2, dtype=torch.float16, quantization="nf4")
        assert torch.equal(span(hidden[0]), hidden[2])
    sizes = prequantized.weight_bytes(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    embeddings = 300 * 128 * 2
    assert sizes["blocks"] + sizes["head"] + embeddings == index["metadata"]["total_size"]
    assert sizes["head"] == 300 * 128 * 2 + 128 * 2
    # nf4: half a byte per weight plus ~1/64 for the double-quantized scales (not float16's 2 bytes)
    weights = 3 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 256)
    assert 0.5 * weights < sizes["blocks"] < 0.6 * weights


@pytest.mark.slow
def test_bench_gpu_with_nf4_runs_end_to_end_on_a_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "NECTAR_BENCH_DIR": str(tmp_path / "bench")}
    args = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--quant", "nf4", "--no-local"]
    args += "--no-one-node --sessions 1 2 --client-processes 0 --repeats 1 --threads 1 --push".split()
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_gpu.py"), *args, "--cache-mb", "256", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert figures["quant"] == "nf4" and figures["nectar"]["decode_tps"] > 0
    assert set(figures["concurrency"]) == {"1", "2"}
    assert figures["floor"]["block_bytes"] > 0 and figures["floor"]["step_bytes"] > figures["floor"]["block_bytes"]
    assert "weights per decode step" in done.stdout
    # --push: a pushing client's runs alternate with the relaying one's, and its tokens are the same
    assert figures["push"]["decode_tps"] > 0 and figures["push"]["same_tokens_as_relay"] is True
