"""Qwen2, Qwen3 and Mixtral through a real swarm: for each, two nodes split the blocks (a third stands by for the
second half), greedy text equals transformers' ``generate``, and stays equal when the second node is killed
mid-generation and the standby takes over. One swarm (bootstrap) for the module; each family's nodes are gone
before the next family's start, so at most three nodes run at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
NODE_ARGS = ["--throughput", "100", "--announce-period", "2"]
NEW_TOKENS = 12
# the path each family's node logs it chose (tests/speed/test_family_paths.py checks the routes themselves)
PATHS = {
    "qwen2": "Inference steps of qwen2 blocks: batched Llama runner",
    "qwen3": "Inference steps of qwen3 blocks: batched Llama runner",
    "mixtral": "generic path, one session at a time through BlockSpan.forward (the mixture-of-experts MLP is not",
}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    # nodes skip timing BLAS libraries and the C decode layer at load (the routes are tests/speed's business)
    env = {"NECTAR_CPU_BLAS": "torch", "NECTAR_NATIVE_DECODE": "off"}
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm"), env=env) as swarm:
        swarm.start_bootstrap()
        yield swarm


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mixtral"])
def test_greedy_text_through_two_nodes_equals_transformers_with_failover(swarm, tmp_path_factory, kind):
    path = str(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{kind}", kind, seed=4))
    with ThreadPoolExecutor(3) as pool:  # the nodes start (mostly imports) side by side
        nodes = list(
            pool.map(
                lambda named: swarm.add_node(path, blocks=named[1], name=f"{kind}-{named[0]}", extra_args=NODE_ARGS),
                (("a", (0, 2)), ("b", (2, 4)), ("c", (2, 4))),
            )
        )
    model = None
    try:
        swarm.wait_for_blocks(path, 4, min_nodes=1)
        assert all(PATHS[kind] in node.log() for node in nodes)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model = DistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, config=ClientConfig(step_timeout=20, connect_timeout=10)
        )
        input_ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(7))
        expected = reference.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        ours = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert ours.tolist() == expected[:, : ours.shape[1]].tolist() and ours.shape[1] > input_ids.shape[1] + 4

        session = model.inference_session(max_length=input_ids.shape[1] + NEW_TOKENS)
        assert [(hop.start, hop.end) for hop in session.route] == [(0, 2), (2, 4)]  # two nodes
        victim_peer = session.route[-1].peer_id
        victim = next(node for node in nodes if node.address.endswith(str(victim_peer)))
        tokens = []
        stream = model.stream_generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, session=session)
        for index, token in enumerate(stream):
            tokens.append(int(token[0]))
            if index == 4:
                swarm.kill(victim)  # abrupt: no goodbye on the DHT
        session.close()
        assert session.failovers >= 1 and victim_peer not in [hop.peer_id for hop in session.route]
        generated = input_ids[0].tolist() + tokens
        assert generated == expected[0, : len(generated)].tolist() and len(tokens) > 4
    finally:
        if model is not None:
            model.shutdown()
        for node in nodes:  # no goodbye needed: the next family announces another model
            swarm.kill(node)
