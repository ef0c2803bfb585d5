"""Turns a built-in name, a folder or a Hub id (``org/name[@revision]``) into a checkpoint folder, its config, its
tokenizer and its DHT name."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from nectar.models.builtin import BUILTIN_MODELS, MARKER_FILE, ensure_converted, is_converted
from nectar.models.errors import MissingCheckpointFileError, ModelNotFoundError, UnsupportedModelError
from nectar.models.hub import hub_model_id, hub_snapshot, parse_hub_id
from nectar.models.registry import supported_model_types

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _not_found_message(name: str) -> str:
    builtins = ", ".join(
        f"{model} ({'converted' if is_converted(model) else 'converted on first use'})" for model in BUILTIN_MODELS
    )
    return (
        f"no model named {name!r}. Built-in models: {builtins}. To use your own model, pass the path of a local "
        f"Hugging Face checkpoint folder (config.json + model.safetensors or model.safetensors.index.json with its "
        f"shards) of a supported architecture ({', '.join(supported_model_types())}), or a Hugging Face Hub id "
        f"(org/name, org/name@revision). `nectar models` lists what is available."
    )


def resolve_model(name_or_path: str | os.PathLike, *, progress: bool = True, token: str | None = None) -> Path:
    """A checkpoint folder for a built-in name (converted on first use), an existing local checkpoint folder, or a
    Hub id (the cache's snapshot folder: config, tokenizer and index fetched now, shards as they are read).

    :param token: Hugging Face token for gated or private Hub models (default: HF_TOKEN or `hf auth login`'s)
    """
    text = os.fspath(name_or_path)
    if text in BUILTIN_MODELS:
        return ensure_converted(text, progress=progress)
    path = Path(text).expanduser()
    ref = parse_hub_id(text)
    if ref is not None and not path.exists():  # a local folder wins over a Hub id of the same spelling
        return hub_snapshot(ref, token=token)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json, so it is not a Hugging Face checkpoint folder. "
                f"Pass a folder written by `save_pretrained` (config.json + *.safetensors) or a built-in name."
            )
        return path.resolve()
    raise ModelNotFoundError(_not_found_message(text))


def model_id_of(path_or_name: str | os.PathLike) -> str:
    """The name announced on the DHT: the built-in name; ``org/name@<commit>`` for a Hub id or a Hub cache snapshot
    (peers agree on the weights, not just the name); else the config's ``_name_or_path``, else the folder name."""
    text = os.fspath(path_or_name)
    if text in BUILTIN_MODELS:
        return text
    path = Path(text).expanduser()
    if parse_hub_id(text) is not None and not path.exists():
        path = resolve_model(text)
    if not path.is_dir():
        raise ModelNotFoundError(_not_found_message(text))
    pinned = hub_model_id(path.resolve())
    if pinned:
        return pinned
    marker = path / MARKER_FILE
    if marker.is_file():
        return json.loads(marker.read_text())["name"]
    try:
        name = json.loads((path / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    # A saved local path says nothing useful to peers; a hub id ("org/model") does.
    if name and not os.path.isabs(name) and not name.startswith((".", "~")):
        return name
    return path.resolve().name


def load_config(path_or_name: str | os.PathLike) -> PretrainedConfig:
    """The transformers config of a model; UnsupportedModelError if transformers cannot read its model_type."""
    path = resolve_model(path_or_name)
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError) as error:
        raise UnsupportedModelError(
            f"cannot read {path / 'config.json'} ({error}). Nectar supports model types: "
            f"{', '.join(supported_model_types())}"
        ) from error


def load_tokenizer(path_or_name: str | os.PathLike):
    """The model's ``AutoTokenizer`` (its chat template comes along when the checkpoint has one)."""
    path = resolve_model(path_or_name)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise MissingCheckpointFileError(
            f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): save one next to the weights with "
            f"`tokenizer.save_pretrained(folder)`",
            filename=str(path / TOKENIZER_FILES[0]),
        )
    return AutoTokenizer.from_pretrained(str(path))
