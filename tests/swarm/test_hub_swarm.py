"""A model by Hub id through a real swarm, offline: each process gets a Hugging Face cache holding only the files it
should read (node a: blocks 0-1's shards, node b: blocks 2-3's, the client: embeddings and head), so any read beyond
its own blocks fails; `nectar generate --model org/name` and the Python client match transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.models import load_tokenizer, model_id_of, resolve_model
from nectar.models.hub import seed_cache
from nectar.models.tiny import save_tiny_sharded_checkpoint
from nectar.node.local_swarm import LocalSwarm

REPO = "tiny-org/tiny-llama"
PROMPT = "w5 w6 w7 w8"
NEW_TOKENS = 6


def pruned_cache(full: Path, target: Path, snapshot: Path, prefixes: tuple[str, ...]) -> Path:
    """A copy of the cache ``full`` whose snapshot keeps only the shards holding tensors named ``prefixes``*: what
    huggingface_hub leaves after downloading just those."""
    shutil.copytree(full, target, symlinks=True)
    folder = target / snapshot.relative_to(full)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {shard for key, shard in weight_map.items() if key.startswith(prefixes)}
    for shard in set(weight_map.values()) - keep:
        (folder / shard).unlink()
    return target


@pytest.fixture(scope="module")
def hub_swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-swarm")
    folder = save_tiny_sharded_checkpoint(root / "checkpoint", seed=0)
    full = root / "full"
    snapshot = seed_cache(folder, REPO, cache=full)
    caches = {
        "a": pruned_cache(full, root / "a", snapshot, ("model.layers.0.", "model.layers.1.")),
        "b": pruned_cache(full, root / "b", snapshot, ("model.layers.2.", "model.layers.3.")),
        "client": pruned_cache(full, root / "client", snapshot, ("model.embed_tokens.", "model.norm.", "lm_head.")),
    }
    with pytest.MonkeyPatch.context() as patch, LocalSwarm(workdir=root / "swarm") as swarm:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(caches["client"]))
        base = {**swarm.env, "HF_HUB_OFFLINE": "1"}
        for name, blocks in (("a", (0, 2)), ("b", (2, 4))):
            swarm.env = {**base, "HF_HUB_CACHE": str(caches[name])}
            swarm.add_node(REPO, blocks=blocks, name=name, extra_args=["--throughput", "100"])
        swarm.env = {**base, "HF_HUB_CACHE": str(caches["client"])}
        swarm.wait_for_blocks(REPO, 4)
        yield swarm, folder, snapshot


def test_nodes_announce_the_commit(hub_swarm):
    swarm, _, snapshot = hub_swarm
    for node in swarm.nodes:
        assert any(line.startswith(f"Hosting {REPO}@{snapshot.name} blocks") for line in node.lines), node.lines


def test_generate_by_hub_id_matches_transformers(hub_swarm):
    swarm, folder, _ = hub_swarm
    tokenizer = load_tokenizer(resolve_model(REPO))
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    expected = reference.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    model = DistributedModelForCausalLM.from_pretrained(
        REPO, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, step_timeout=20)
    )
    try:
        assert model.model_id == model_id_of(REPO)
        ours = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        model.shutdown()
    assert ours.tolist() == expected.tolist()
    # the CLI, as a user types it
    env = {**swarm.env, "NECTAR_INITIAL_PEERS": " ".join(swarm.initial_peers)}
    command = ["generate", "--model", REPO, "--max-new-tokens", str(NEW_TOKENS), PROMPT]
    done = subprocess.run(
        [sys.executable, "-m", "nectar.cli", *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    continuation = tokenizer.decode(expected[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert continuation and continuation in done.stdout
