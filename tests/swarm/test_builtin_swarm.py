"""The built-in SmolLM2-135M through a 2-node swarm, driven by the CLI as an operator would."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.client import DistributedModelForCausalLM
from nectar.models import load_tokenizer, resolve_model
from nectar.node.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    resolve_model(MODEL)  # convert once (cached in NECTAR_HOME) before nodes start
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.add_node(MODEL, blocks=(0, 15), name="first", extra_args=["--throughput", "100"])
        swarm.add_node(MODEL, blocks=(15, 30), name="second", extra_args=["--throughput", "100"])
        swarm.wait_for_blocks(MODEL, 30)
        yield swarm


def test_builtin_generation_matches_transformers(swarm):
    tokenizer = load_tokenizer(resolve_model(MODEL))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = DistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=swarm.initial_peers)
    try:
        ours = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    finally:
        model.shutdown()
    reference = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()
    theirs = reference.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    assert "Paris" in tokenizer.decode(ours[0, input_ids.shape[1] :])


def test_cli_swarm_and_generate(swarm):
    env = {**swarm.env, "NECTAR_INITIAL_PEERS": " ".join(swarm.initial_peers)}
    shown = subprocess.run(
        [sys.executable, "-m", "nectar.cli", "swarm"], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert "first" in shown.stdout and "0:15" in shown.stdout and "15:30" in shown.stdout
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "nectar.cli",
            "generate",
            "--chat",
            "--max-new-tokens",
            "12",
            "What is the capital of France?",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert generated.returncode == 0, generated.stderr
    assert "Paris" in generated.stdout and "tokens/s" in generated.stderr
    chatted = subprocess.run(
        [sys.executable, "-m", "nectar.cli", "chat", "--max-new-tokens", "8"],
        env=env,
        input="What is the capital of France?\n\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert chatted.returncode == 0, chatted.stderr
    assert "assistant>" in chatted.stdout and "Paris" in chatted.stdout
