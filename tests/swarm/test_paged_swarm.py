"""A node with the paged KV pool (``--kv-page-size``): generations through it equal local transformers', sessions
come and go through one pool, and its info RPC counts the pages sessions reserve."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.node.local_swarm import LocalSwarm
from nectar.wire.protocol import RPC_INFO, make_request, unpack_metadata
from nectar.wire.stubs import call_unary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        args = ["--throughput", "100", "--announce-period", "2", "--kv-page-size", "4", "--cache-mb", "4"]
        swarm.add_node(tiny_llama, blocks=(0, 4), name="paged", extra_args=args)
        swarm.wait_for_blocks(tiny_llama, 4, min_nodes=1)
        yield swarm


def _compute(model) -> dict:
    servers = model.sequence_manager.servers()
    (peer, info), *_ = {peer: info for block in servers.values() for peer, info in block.items()}.items()
    response = model.runtime.run(
        call_unary(model.runtime.p2p, peer, info, RPC_INFO, make_request("", [], {}), timeout=20), timeout=30
    )
    return unpack_metadata(response.metadata)["compute"]


def test_generations_through_the_page_pool_equal_local_transformers(model, tiny_llama):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [
        torch.randint(3, 1000, (1, 3 + seed), generator=torch.Generator().manual_seed(seed)) for seed in range(4)
    ]
    expected = [reference.generate(p, max_new_tokens=18, do_sample=False, eos_token_id=None) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # sessions share the node's rounds and its pool
        ours = list(pool.map(lambda p: model.generate(p, max_new_tokens=18, do_sample=False), prompts))
    for got, want in zip(ours, expected):
        assert got.tolist() == want[:, : got.shape[1]].tolist()
    # sessions of two rows keep their own caches beside the pool
    batch = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(9))
    assert (
        model.generate(batch, max_new_tokens=6, do_sample=False).tolist()
        == reference.generate(batch, max_new_tokens=6, do_sample=False, eos_token_id=None).tolist()
    )
    compute = _compute(model)
    assert compute["graph_rounds"] > 0  # decode rounds went through the paged step
    assert compute["kv_pages_reserved"] == 0  # every session ended: its pages are back
