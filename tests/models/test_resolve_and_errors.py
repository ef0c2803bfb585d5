"""Names, folders and bad inputs: each failure is a named error whose message says what to do next."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nectar.models import (
    MissingCheckpointFileError,
    ModelNotFoundError,
    SpanRangeError,
    UnsupportedModelError,
    get_family,
    load_client_head,
    load_config,
    load_span,
    load_tokenizer,
    model_id_of,
    resolve_model,
)


def test_local_folder_resolves_to_itself(tiny_paths):
    assert resolve_model(tiny_paths["llama"]) == tiny_paths["llama"].resolve()
    assert resolve_model(str(tiny_paths["bloom"])) == tiny_paths["bloom"].resolve()


def test_unknown_name_lists_builtins_and_explains_paths():
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("no-such-model")
    message = str(caught.value)
    assert "smollm2-135m" in message and "path" in message and "config.json" in message


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_model_id_of_names(tiny_paths, tmp_path):
    assert model_id_of("smollm2-135m") == "smollm2-135m"
    assert model_id_of(tiny_paths["llama"]) == "llama"  # the folder name
    named = tmp_path / "checkpoint"
    shutil.copytree(tiny_paths["llama"], named)
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-llama"}))
    assert model_id_of(named) == "org/tiny-llama"
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "/home/someone/tiny"}))
    assert model_id_of(named) == "checkpoint"
    with pytest.raises(ModelNotFoundError):
        model_id_of(tmp_path / "missing")


def test_family_lookup(tiny_paths):
    for kind in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom", "gemma2", "falcon"):
        assert get_family(load_config(tiny_paths[kind])).name == kind  # each family its own subpackage
    assert get_family(load_config(tiny_paths["llama"])).num_blocks(load_config(tiny_paths["llama"])) == 4


@pytest.mark.parametrize("model_type", ["gpt2", "not-a-real-architecture"])
def test_unregistered_model_type_names_supported_ones(tiny_paths, tmp_path, model_type):
    shutil.copytree(tiny_paths["llama"], tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": model_type}))
    for load in (lambda: load_span(tmp_path / "model", 0, 1), lambda: load_client_head(tmp_path / "model")):
        with pytest.raises(UnsupportedModelError) as caught:
            load()
        assert all(name in str(caught.value) for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom"))
    with pytest.raises(
        UnsupportedModelError, match="gpt2.*not supported.*bloom, .*llama, mistral, mixtral, qwen2, qwen3"
    ):
        get_family("gpt2")


@pytest.mark.parametrize("start,end", [(0, 5), (-1, 2), (2, 2), (3, 1), (4, 5)])
def test_span_out_of_bounds(tiny_paths, start, end):
    with pytest.raises(SpanRangeError, match=r"4 blocks.*0 <= start < end <= 4"):
        load_span(tiny_paths["llama"], start, end)


def test_missing_tokenizer_names_the_file(tiny_paths):
    with pytest.raises(MissingCheckpointFileError, match="tokenizer.json"):
        load_tokenizer(tiny_paths["llama"])


def test_out_of_vocabulary_token_is_refused(tiny_paths):
    head = load_client_head(tiny_paths["bloom"])
    long_prompt = torch.arange(100)[None] % 1000
    long_prompt[0, 50] = -3
    # a decode step's few ids are checked in Python, a prompt's through a tensor op: both refuse
    for ids, shown in (([[1, 1000]], "1..1000"), ([[-1]], "-1..-1"), (long_prompt, "-3..99")):
        with pytest.raises(ValueError, match=rf"token ids must be in \[0, 1000\), got {shown}"):
            head.embed(torch.as_tensor(ids))
    assert head.embed(torch.tensor([[999]])).shape == (1, 1, head.embedding_dim)
