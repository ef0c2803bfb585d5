"""Fixtures for nectar.models tests: tiny random checkpoints (Llama with GQA, Mistral, Qwen2, Qwen3, Mixtral, BLOOM,
Gemma 2, Falcon 40B-style) and their references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.models import BlockSpan, ClientHead
from nectar.models.tiny import save_tiny_checkpoint

KINDS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom", "gemma2", "falcon")
NUM_LAYERS = 4


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny_checkpoint(root / kind, kind, num_layers=NUM_LAYERS) for kind in KINDS}


@pytest.fixture(scope="session")
def reference_models(tiny_paths) -> dict[str, torch.nn.Module]:
    """transformers' own full models, loaded from the same checkpoints."""
    return {kind: AutoModelForCausalLM.from_pretrained(str(path)).eval() for kind, path in tiny_paths.items()}


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


def _reference_hidden_states(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden_states[i] is block i's input; the last one is after the final norm."""
    with torch.no_grad():
        return model(input_ids, output_hidden_states=True).hidden_states


def _run_spans(spans: list[BlockSpan], hidden: torch.Tensor, caches=None) -> torch.Tensor:
    for index, span in enumerate(spans):
        hidden = span(hidden, cache=caches[index] if caches is not None else None)
    return hidden


def _greedy_generate(head: ClientHead, spans: list[BlockSpan], input_ids: torch.Tensor, max_new_tokens: int):
    """Greedy decoding the way a client drives a swarm: prefill once, then one token per step through cached spans."""
    batch_size, length = input_ids.shape
    caches = [span.new_cache(batch_size, length + max_new_tokens) for span in spans]
    tokens = input_ids
    step_input = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            hidden = _run_spans(spans, head.embed(step_input), caches)
            next_token = head.greedy_tokens(hidden[:, -1:])[:, None]  # as generate() picks greedy tokens
            tokens = torch.cat([tokens, next_token], dim=1)
            step_input = next_token
    return tokens


# Helpers are handed out as fixtures: test modules cannot import a conftest reliably next to other areas' conftests.
@pytest.fixture(scope="session")
def reference_hidden_states():
    return _reference_hidden_states


@pytest.fixture(scope="session")
def run_spans():
    return _run_spans


@pytest.fixture(scope="session")
def greedy_generate():
    return _greedy_generate
