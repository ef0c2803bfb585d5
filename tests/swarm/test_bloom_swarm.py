"""BLOOM (ALiBi) through a real 2-node swarm: span exactness and greedy equality with transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.client import DistributedModelForCausalLM
from nectar.client.routing import RemoteSpan
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.protocol import RPC_FORWARD

from .conftest import layer_outputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tiny_bloom, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.add_node(tiny_bloom, blocks=(0, 3), name="left", extra_args=["--throughput", "100"])
        swarm.add_node(tiny_bloom, blocks=(3, 4), name="right", extra_args=["--throughput", "100"])
        swarm.wait_for_blocks(tiny_bloom, 4)
        model = DistributedModelForCausalLM.from_pretrained(tiny_bloom, initial_peers=swarm.initial_peers)
        yield model
        model.shutdown()


def test_bloom_spans_match_local(model, tiny_bloom):
    reference = AutoModelForCausalLM.from_pretrained(tiny_bloom, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 1000, (2, 6))
    expected = layer_outputs(reference, input_ids)
    model.sequence_manager.update(force=True)
    spans = {
        info.public_name: (peer, info)
        for servers in model.sequence_manager.servers().values()
        for peer, info in servers.items()
    }
    for name, start, end in [("left", 0, 3), ("left", 1, 2), ("right", 3, 4)]:
        peer, info = spans[name]
        span = RemoteSpan(peer, start, end, info)
        output = model.transformer.caller.call(RPC_FORWARD, span, [expected[start]], receipt_inputs=expected[start])[0]
        torch.testing.assert_close(output, expected[end], atol=1e-4, rtol=0)
    ours = model.generate(input_ids[:1], max_new_tokens=16, do_sample=False)
    theirs = reference.generate(input_ids[:1], max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert ours.tolist() == theirs[:, : ours.shape[1]].tolist()
