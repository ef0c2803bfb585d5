"""A node with ``--quant int8`` in a real swarm (issue 23, item 3): its record announces the mode, ``nectar swarm``
shows it, a client's greedy generation through it equals a local int8 span's (its receipts, committing to int8, pass
the client's checks), and a client that requires full-precision weights does not route to it."""

from __future__ import annotations

import pytest
import torch

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.client.cli import swarm_main
from nectar.client.errors import RouteUnavailableError
from nectar.models import load_client_head, load_span
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.dht import ClientRuntime
from nectar.wire.swarm import read_swarm

pytestmark = pytest.mark.slow

BLOCKS = 4


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.add_node(tiny_llama, blocks=(0, BLOCKS), name="q", extra_args=["--quant", "int8", "--throughput", "100"])
        swarm.wait_for_blocks(tiny_llama, BLOCKS)
        yield swarm


def test_the_record_and_nectar_swarm_show_the_mode(swarm, tiny_llama, capsys):
    runtime = ClientRuntime(swarm.initial_peers)
    try:
        servers = read_swarm(runtime, "tiny-llama", BLOCKS).servers()
    finally:
        runtime.shutdown()
    assert [info.quant for info in servers.values()] == ["int8"]
    assert swarm_main(["--model", tiny_llama, "--initial-peers", *swarm.initial_peers]) == 0
    assert "float32+int8" in capsys.readouterr().out


def test_generation_through_an_int8_node_equals_a_local_int8_span(swarm, tiny_llama):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, step_timeout=30)
    )
    try:
        input_ids = torch.tensor([[5, 17, 42, 99, 3]])
        with torch.no_grad():
            ours = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    finally:
        model.shutdown()
    head, span = load_client_head(tiny_llama), load_span(tiny_llama, 0, BLOCKS, quantization="int8")
    tokens, step = input_ids, input_ids
    cache = span.new_cache(1, input_ids.shape[1] + 12)
    with torch.inference_mode():
        for _ in range(12):
            step = head.greedy_tokens(span(head.embed(step), cache=cache)[:, -1:])[:, None]
            tokens = torch.cat([tokens, step], 1)
    assert ours.tolist() == tokens.tolist()
    full = load_span(tiny_llama, 0, BLOCKS)
    with torch.no_grad():  # and int8 really is what it served: full precision differs from it
        hidden = head.embed(tokens)
        assert not torch.equal(full(hidden), span(hidden))


def test_a_client_requiring_full_precision_does_not_route_to_it(swarm, tiny_llama):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, quant="none")
    )
    try:
        with pytest.raises(RouteUnavailableError, match=r"serves int8 weights \(--quant allows none\)"):
            model.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=2, do_sample=False)
    finally:
        model.shutdown()
