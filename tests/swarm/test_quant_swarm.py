"""A node with ``--quant int8`` in a real swarm (issue 23, item 3): its record announces the mode, ``nectar swarm``
shows it, a client's greedy generation through it equals a local int8 span's (its receipts, committing to int8, pass
the client's checks), concurrent generations share its batched rounds and each equals its generation alone, and a
client that requires full-precision weights does not route to it."""

from __future__ import annotations

import threading

import pytest
import torch

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.client.cli import swarm_main
from nectar.client.errors import RouteUnavailableError
from nectar.models import load_client_head, load_span
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.dht import ClientRuntime
from nectar.wire.swarm import read_swarm
from tests.swarm.info import node_compute_counters

pytestmark = pytest.mark.slow

BLOCKS = 4


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        # --batch-wait: a round waits for the last rounds' sessions, so concurrent steps meet however the machine runs
        swarm.add_node(
            tiny_llama,
            blocks=(0, BLOCKS),
            name="q",
            extra_args=["--quant", "int8", "--throughput", "100", "--batch-wait", "1"],
        )
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


def test_concurrent_generations_are_batched_and_each_equals_its_generation_alone(swarm, tiny_llama):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, step_timeout=30)
    )
    head, new_tokens = load_client_head(tiny_llama), 10
    prompts = [[5, 17, 42, 99, 3], [7, 8], [300, 12, 55], [1, 2, 3, 4, 5, 6, 7]]  # prefills of different lengths
    generated: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def client(index: int) -> None:  # greedy generation, its steps sent with the other clients' (lock step)
        try:
            step = torch.tensor([prompts[index]])
            with model.inference_session(max_length=len(prompts[index]) + new_tokens) as session:
                for _ in range(new_tokens):
                    barrier.wait(timeout=60)
                    with torch.inference_mode():
                        step = head.greedy_tokens(session.step(head.embed(step))[:, -1:])[:, None]
                    generated[index].append(int(step))
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        counters = node_compute_counters(model)
    finally:
        model.shutdown()
    assert not errors, errors
    # the node's batch runner took several sessions' steps in one forward (0 on the generic path)
    assert counters["max_runner_batch"] >= 2, counters
    span = load_span(tiny_llama, 0, BLOCKS, quantization="int8")
    for prompt, tokens in zip(prompts, generated):
        alone, step = [], torch.tensor([prompt])
        cache = span.new_cache(1, len(prompt) + new_tokens)
        with torch.inference_mode():
            for _ in range(new_tokens):
                step = head.greedy_tokens(span(head.embed(step), cache=cache)[:, -1:])[:, None]
                alone.append(int(step))
        assert tokens == alone


def test_a_client_requiring_full_precision_does_not_route_to_it(swarm, tiny_llama):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, quant="none")
    )
    try:
        with pytest.raises(RouteUnavailableError, match=r"serves int8 weights \(--quant allows none\)"):
            model.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=2, do_sample=False)
    finally:
        model.shutdown()
