"""Shared fixtures: tiny random checkpoints and real swarms of separate processes on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.models.tiny import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", seed=0))


@pytest.fixture(scope="module")
def model(swarm, tiny_llama):
    """A client of the module's ``swarm`` (each module starts its own) that fails fast: no retries, 10 s steps.
    Modules that need another client define their own ``model``."""
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, step_timeout=10)
    )
    yield model
    model.shutdown()


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bloom", "bloom", seed=1))


def layer_outputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """[input to block 0, output of block 0, output of block 1, ...] from a local transformers model."""
    captured = []
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    hooks = [
        layer.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
        for layer in layers
    ]
    first = []
    hooks.append(
        layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: first.append(kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True,
        )
    )
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [first[0]] + captured
