"""Reads chosen tensors from a safetensors checkpoint folder (one file or shards + index), never the whole model."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from nectar.models.errors import CheckpointError, MissingCheckpointFileError
from nectar.models.hub import hub_fetcher

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 1024**2  # a real index of a 400B-parameter model is a few MB


class Checkpoint:
    """Index of one checkpoint folder: which file holds each tensor. Used by ``load_span`` and ``load_client_head``.

    Opening reads only the index (or the single file's header); ``load`` then reads just the named tensors, one
    ``safe_open`` per file involved, so a span never touches shards that hold only other blocks.

    :param path: folder with ``model.safetensors`` or ``model.safetensors.index.json`` plus its shards
    :param fetch: gets a shard that is not in the folder yet (filename -> its path); default: a Hub cache snapshot's
      downloader (``nectar.models.hub``) for such folders, else none (a missing shard is an error)
    """

    def __init__(self, path: str | os.PathLike, *, fetch: Callable[[str], Path] | None = None):
        self.path = Path(path)
        self.fetch = fetch or hub_fetcher(self.path)
        index_path, single_path = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index_path.is_file():
            self.weight_map = self._read_index(index_path)
        elif single_path.is_file():
            with safe_open(str(single_path), framework="pt") as handle:
                self.weight_map = {key: SINGLE_FILE for key in handle.keys()}
        else:
            raise MissingCheckpointFileError(
                f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}. Nectar reads safetensors checkpoints: "
                f"re-save the model with `model.save_pretrained(folder)` (transformers writes safetensors).",
                filename=str(single_path),
            )
        self.loaded_keys: list[str] = []  # every tensor read so far, in order (lets callers audit what was read)

    @staticmethod
    def _read_index(index_path: Path) -> dict[str, str]:
        if index_path.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{index_path} is larger than {MAX_INDEX_BYTES} bytes: not a safetensors index")
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index_path} is not a valid safetensors index (expected JSON with a 'weight_map' object): {error}"
            ) from error
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise CheckpointError(f"{index_path}: 'weight_map' values must be shard file names")
        for filename in set(weight_map.values()):  # a downloaded index names files: only ones inside the folder
            parts = PurePosixPath(filename).parts
            if len(parts) != 1 or parts[0] in (".", "..") or "\\" in filename or not filename.endswith(".safetensors"):
                raise CheckpointError(f"{index_path}: shard name {filename!r} is not a .safetensors file of the folder")
        return weight_map

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def first_present(self, candidates: tuple[str, ...]) -> str | None:
        return next((key for key in candidates if key in self.weight_map), None)

    def has_prefix(self, prefix: str) -> bool:
        return any(key.startswith(prefix) for key in self.weight_map)

    def load(
        self, keys: list[str], *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Read exactly ``keys`` (cast to ``dtype`` if given); clear errors for unknown keys or missing shard files."""
        unknown = [key for key in keys if key not in self.weight_map]
        if unknown:
            raise CheckpointError(f"{self.path} has no tensors named {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.weight_map[key]].append(key)
        tensors: dict[str, torch.Tensor] = {}
        for filename, file_keys in by_file.items():
            file_path = self.path / filename
            if not file_path.is_file() and self.fetch is not None:
                file_path = self.fetch(filename)  # only the shards holding wanted tensors are ever fetched
            if not file_path.is_file():
                raise MissingCheckpointFileError(
                    f"checkpoint file {file_path} is missing; it holds {len(file_keys)} needed tensors "
                    f"(e.g. {file_keys[0]}). Restore it (re-download or re-save the checkpoint).",
                    filename=str(file_path),
                )
            with safe_open(str(file_path), framework="pt", device=str(device)) as handle:
                for key in file_keys:
                    tensor = handle.get_tensor(key)
                    tensors[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            self.loaded_keys.extend(file_keys)
        logger.debug("Read %d tensors from %d file(s) of %s", len(tensors), len(by_file), self.path)
        return tensors
