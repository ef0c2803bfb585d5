"""A node serving a pre-quantized nf4 checkpoint (issue 25, point 5) in a real swarm: it announces nf4, and a client's
greedy generation through it equals a local span quantized at load from the same float weights (the receipts,
committing to nf4, pass the client's checks). load_span refuses another --quant (tests/models/test_prequant.py)."""

from __future__ import annotations

import pytest
import torch

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.models import load_client_head, load_span
from nectar.models.tiny import save_prequantized_checkpoint
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.dht import ClientRuntime
from nectar.wire.swarm import read_swarm

pytestmark = pytest.mark.slow

BLOCKS = 4


@pytest.fixture(scope="module")
def prequantized(tiny_llama, tmp_path_factory):
    return str(save_prequantized_checkpoint(tmp_path_factory.mktemp("nf4") / "tiny-llama-nf4", tiny_llama, "nf4"))


@pytest.fixture(scope="module")
def swarm(prequantized, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.add_node(prequantized, blocks=(0, BLOCKS), name="q", extra_args=["--quant", "nf4", "--throughput", "100"])
        swarm.wait_for_blocks(prequantized, BLOCKS)
        yield swarm


def test_generation_through_a_prequantized_node_equals_quantizing_at_load(swarm, prequantized, tiny_llama):
    runtime = ClientRuntime(swarm.initial_peers)
    try:
        servers = read_swarm(runtime, "tiny-llama-nf4", BLOCKS).servers()
    finally:
        runtime.shutdown()
    assert [info.quant for info in servers.values()] == ["nf4"]
    model = DistributedModelForCausalLM.from_pretrained(
        prequantized, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, step_timeout=30)
    )
    assert model.client_config.quant == "nf4"  # routes only to nodes announcing the stored mode
    try:
        input_ids = torch.tensor([[5, 17, 42, 99, 3]])
        with torch.no_grad():
            ours = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    finally:
        model.shutdown()
    head, span = load_client_head(tiny_llama), load_span(tiny_llama, 0, BLOCKS, quantization="nf4")
    tokens, step = input_ids, input_ids
    cache = span.new_cache(1, input_ids.shape[1] + 12)
    with torch.inference_mode():
        for _ in range(12):
            step = head.greedy_tokens(span(head.embed(step), cache=cache)[:, -1:])[:, None]
            tokens = torch.cat([tokens, step], 1)
    assert ours.tolist() == tokens.tolist()
