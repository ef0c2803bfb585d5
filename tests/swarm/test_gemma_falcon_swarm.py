"""Gemma 2 and Falcon (40B/180B style) through a real swarm, one family after the other: every node's span equals
transformers' layers, greedy text equals transformers' ``generate``, a node killed mid-generation is replaced, and the
nodes log that these families take the generic path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.client.routing import RemoteSpan
from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.protocol import RPC_FORWARD

from .conftest import layer_outputs

pytestmark = pytest.mark.slow
NODE_ARGS = ["--throughput", "100", "--announce-period", "2"]
REASONS = {"gemma2": "soft-capping", "falcon": "parallel attention"}


@pytest.fixture(scope="module", params=["gemma2", "falcon"])
def family(request, tmp_path_factory):
    """(kind, swarm, client, transformers' model): a first node with blocks 0:2, two with 2:4 (one to fail over to)."""
    kind = request.param
    path = str(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{kind}", kind, seed=2))
    with LocalSwarm(workdir=tmp_path_factory.mktemp(f"swarm-{kind}")) as swarm:
        swarm.start_bootstrap()
        with ThreadPoolExecutor(3) as pool:  # the nodes' start-up (imports) overlaps: a third of the wait
            started = [
                pool.submit(swarm.add_node, path, blocks=blocks, name=name, extra_args=NODE_ARGS)
                for name, blocks in (("a", (0, 2)), ("b", (2, 4)), ("c", (2, 4)))
            ]
            for future in started:
                future.result()
        swarm.wait_for_blocks(path, 4, min_nodes=1)
        model = DistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, config=ClientConfig(step_timeout=20, connect_timeout=10)
        )
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield kind, swarm, model, reference
        model.shutdown()


def test_spans_match_transformers_and_the_nodes_log_the_generic_path(family):
    kind, swarm, model, reference = family
    input_ids = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = layer_outputs(reference, input_ids)
    model.sequence_manager.update(force=True)
    spans = {
        info.public_name: (peer, info)
        for servers in model.sequence_manager.servers().values()
        for peer, info in servers.items()
    }
    for name, start, end in [("a", 0, 2), ("a", 1, 2), ("b", 2, 4), ("c", 3, 4)]:
        peer, info = spans[name]
        span = RemoteSpan(peer, start, end, info)
        output = model.transformer.caller.call(RPC_FORWARD, span, [expected[start]], receipt_inputs=expected[start])[0]
        torch.testing.assert_close(output, expected[end], atol=1e-4, rtol=0)
    for node in swarm.nodes:
        assert f"Inference steps of {kind} blocks: generic path" in node.log() and REASONS[kind] in node.log()


def test_greedy_text_equals_transformers_generate(family):
    kind, swarm, model, reference = family
    for seed in range(2):  # 18 tokens: past Gemma 2's 4-token window many times over
        input_ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(seed))
        ours = model.generate(input_ids, max_new_tokens=12, do_sample=False)
        theirs = reference.generate(input_ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert ours.tolist() == theirs[:, : ours.shape[1]].tolist()


def test_failover_mid_generation_gives_identical_text(family):
    kind, swarm, model, reference = family
    input_ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(7))
    expected = reference.generate(input_ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
    session = model.inference_session(max_length=22)
    victim_peer = session.route[-1].peer_id
    victim = next(node for node in swarm.nodes if node.address.endswith(str(victim_peer)))
    tokens = []
    for i, token in enumerate(model.stream_generate(input_ids, max_new_tokens=16, do_sample=False, session=session)):
        tokens.append(int(token[0]))
        if i == 6:
            swarm.kill(victim)  # abrupt: no goodbye on the DHT
    session.close()
    assert session.failovers >= 1 and victim_peer not in [span.peer_id for span in session.route]
    assert input_ids[0].tolist() + tokens == expected[0].tolist()
