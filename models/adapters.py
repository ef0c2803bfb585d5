"""LoRA adapters on a node's blocks (PEFT's saved format), switched per request.

A PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) is read for the node's blocks only:
tensors ``base_model.model.<block prefix><module>.lora_A/B.weight``. Each targeted ``nn.Linear`` then computes
``y = W x + b + scale * B (A x)`` (PEFT's LoRA forward, dropout off) while that adapter is active, and its plain
``W x + b`` otherwise. The block modules stay as they are (a forward hook adds the update), so the fused fast path,
which reads their weights directly, is unchanged; sessions with an adapter take the generic path (``nectar.node``).

Adapter names reach nodes from clients, so a name is a plain token (``ADAPTER_NAME``), never a path: a node serves
only the folders its operator listed and looks a requested name up among them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nectar.models.errors import ModelError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # no "/" or "\\": a name can never be a path
MAX_ADAPTER_FILE_BYTES = 2 * 1024**3  # a LoRA of a 70B model at rank 64 is ~1 GiB; anything past this is not one
MAX_ADAPTER_CONFIG_BYTES = 1024**2
MAX_RANK = 1024
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class AdapterError(ModelError, ValueError):
    """An adapter folder is missing, malformed, not a plain LoRA or does not fit the base model."""


def check_adapter_name(name: object) -> str:
    """``name`` if it is a valid adapter name, else ``AdapterError`` (names are user input)."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise AdapterError(
            f"adapter names are 1-64 letters, digits, '.', '_' or '-' (no paths), got {str(name)[:80]!r}: "
            "ask for an adapter by the name nodes announce (`nectar swarm` lists them)"
        )
    return name


@dataclass
class LoraAdapter:
    """One adapter's LoRA weights for blocks [start, end) of a model.

    :param weights: global block index -> {module path inside the block: (A [r, in], B [out, r])}
    :param digest: sha256 of the config and weights files: what was computed with, for receipts and audits
    """

    name: str
    path: Path
    scaling: float
    rank: int
    target_modules: tuple[str, ...]
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(repr=False)
    digest: bytes = field(repr=False)
    base_model: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for block in self.weights.values() for a, b in block.values())


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterError(
            f"no adapter folder {path}: pass the folder PeftModel.save_pretrained wrote (Hub ids are not resolved "
            "here: download the adapter first)"
        )
    if not config_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(
            f"{path} is not a PEFT adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(written by PeftModel.save_pretrained)"
        )
    if config_path.stat().st_size > MAX_ADAPTER_CONFIG_BYTES:
        raise AdapterError(f"{config_path} is over {MAX_ADAPTER_CONFIG_BYTES} bytes: not an adapter config")
    if (path / WEIGHTS_FILE).stat().st_size > MAX_ADAPTER_FILE_BYTES:
        raise AdapterError(f"{path / WEIGHTS_FILE} is over {MAX_ADAPTER_FILE_BYTES} bytes: too large for a LoRA here")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise AdapterError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path} must hold a JSON object")
    unsupported = {
        "peft_type": (config.get("peft_type") or "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": (config.get("bias") or "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "layer_replication": bool(config.get("layer_replication")),
        "lora_bias": bool(config.get("lora_bias")),
    }
    bad = [name for name, yes in unsupported.items() if yes]
    if bad:
        raise AdapterError(
            f"{path}: nodes serve plain LoRA adapters only; this one sets {', '.join(bad)}. Save a LoRA without "
            "them (merge it into the weights and serve the merged checkpoint instead)"
        )
    return config


def _scaling(config: dict, path: Path) -> tuple[int, float]:
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if rank.__class__ is not int or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"{path}: r must be an integer in [1, {MAX_RANK}], got {rank!r}")
    if not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    # PEFT: alpha / r, or alpha / sqrt(r) with rsLoRA
    return rank, float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _same_model(name: str, accepted: set[str]) -> bool:
    tail = name.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].lower()
    return any(tail == known.rstrip("/").rsplit("/", 1)[-1].lower() for known in accepted if known)


def adapter_digest(path: str | os.PathLike) -> bytes:
    """sha256 of an adapter folder's config and weights files: what receipts bind and verifiers look adapters up by."""
    path = Path(path)
    hasher = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(path / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                hasher.update(chunk)
    return hasher.digest()


def read_adapter_files(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """An adapter folder's config and weights files, as ``adapter_digest`` hashes them (for a verifier auditing
    steps made with it); bounded like any adapter read here."""
    path = Path(path)
    files = []
    for name, limit in ((CONFIG_FILE, MAX_ADAPTER_CONFIG_BYTES), (WEIGHTS_FILE, MAX_ADAPTER_FILE_BYTES)):
        with open(path / name, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise AdapterError(f"{path / name} is over {limit} bytes: not an adapter file served here")
        files.append(data)
    return files[0], files[1]


def load_lora_adapter(
    path: str | os.PathLike,
    *,
    blocks: dict[int, nn.Module],
    prefixes: Callable[[int], tuple[str, ...]],
    num_model_blocks: int,
    base_names: set[str] = frozenset(),
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LoraAdapter:
    """Reads a PEFT LoRA folder for ``blocks`` (global index -> the built block) and checks it against them.

    :param prefixes: a block's checkpoint key prefixes (``ModelFamily.block_prefixes``)
    :param base_names: names of the base model; an adapter whose ``base_model_name_or_path`` names another is refused
    :param name: the adapter's name; default: the folder's name
    """
    path = Path(path).expanduser().resolve()
    config = _read_config(path)
    name = check_adapter_name(name or path.name)
    rank, scaling = _scaling(config, path)
    base = config.get("base_model_name_or_path") or ""
    if base and base_names and not _same_model(str(base), set(base_names)):
        raise AdapterError(
            f"adapter {name} ({path}) was trained on {base!r}, this node serves {sorted(base_names)[0]!r}: "
            "serve it on a node of its base model"
        )
    # which block each key belongs to: the longest matching prefix (e.g. "model.layers.1." vs "model.layers.10.")
    by_prefix = sorted(
        ((prefix, index) for index in range(num_model_blocks) for prefix in prefixes(index)),
        key=lambda item: -len(item[0]),
    )
    weights: dict[int, dict[str, list]] = {}
    targets: set[str] = set()
    try:  # the files may come from a peer (a verifier fetches an audited node's): unreadable is malformed
        with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            for key in keys:
                match = _KEY.match(key)
                if match is None:
                    raise AdapterError(
                        f"{path / WEIGHTS_FILE} holds {key!r}, not a LoRA A/B weight of a block: nodes serve "
                        "adapters of the transformer blocks only (no embeddings, head or extra trained modules)"
                    )
                found = next(((p, i) for p, i in by_prefix if match["module"].startswith(p)), None)
                if found is None:
                    raise AdapterError(f"{path / WEIGHTS_FILE}: {key!r} names no block of this model")
                prefix, index = found
                module = match["module"][len(prefix) :]
                targets.add(module.rsplit(".", 1)[-1])
                if index not in blocks:
                    continue  # another node's block: not read
                tensor = f.get_tensor(key)
                pair = weights.setdefault(index, {}).setdefault(module, [None, None])
                pair[0 if match["part"] == "A" else 1] = tensor
    except SafetensorError as e:
        raise AdapterError(
            f"{path / WEIGHTS_FILE} is not a readable safetensors file ({e}): save it with PEFT"
        ) from None
    if not weights and not targets:
        raise AdapterError(f"{path / WEIGHTS_FILE} holds no LoRA weights")
    declared = config.get("target_modules")
    if isinstance(declared, list) and declared and not targets <= {str(t).rsplit(".", 1)[-1] for t in declared}:
        raise AdapterError(f"{path}: weights for {sorted(targets)} but target_modules says {declared}")

    checked: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for index, modules in weights.items():
        for module, (a, b) in modules.items():
            where = f"{path.name}: block {index} {module}"
            if a is None or b is None:
                raise AdapterError(f"{where} has only one of lora_A / lora_B")
            try:
                linear = blocks[index].get_submodule(module)
            except AttributeError:
                raise AdapterError(f"{where}: the base model's blocks have no module {module!r}") from None
            if not isinstance(linear, nn.Linear):
                raise AdapterError(f"{where}: {module!r} is a {type(linear).__name__}, LoRA here adapts nn.Linear")
            if (
                a.ndim != 2
                or b.ndim != 2
                or a.shape != (rank, linear.in_features)
                or b.shape != (linear.out_features, rank)
            ):
                raise AdapterError(
                    f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a rank-{rank} update of "
                    f"a {linear.in_features}->{linear.out_features} layer: the adapter is for another model"
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"{where}: LoRA weights contain NaN or infinity")
            checked.setdefault(index, {})[module] = (
                a.to(device=device, dtype=dtype).contiguous(),
                b.to(device=device, dtype=dtype).contiguous(),
            )
    return LoraAdapter(
        name=name,
        path=path,
        scaling=scaling,
        rank=rank,
        target_modules=tuple(sorted(targets)),
        weights=checked,
        digest=adapter_digest(path),
        base_model=str(base),
    )


class AdapterSlot:
    """Which adapter the hooked blocks apply now (None: the base model). Set only on the thread that computes."""

    def __init__(self):
        self.active: str | None = None

    @contextlib.contextmanager
    def use(self, name: str | None):
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous


class _LoraHook:
    """Adds ``scale * B (A x)`` of the active adapter to one Linear's output (PEFT's LoRA forward, no dropout)."""

    def __init__(self, slot: AdapterSlot):
        self.slot = slot
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        name = self.slot.active
        if name is None:
            return output
        update = self.updates.get(name)
        if update is None:
            return output
        a, b, scaling = update
        x = args[0]
        return output + (nn.functional.linear(nn.functional.linear(x.to(a.dtype), a), b) * scaling).to(output.dtype)


def attach_adapter(blocks: dict[int, nn.Module], adapter: LoraAdapter, slot: AdapterSlot) -> None:
    """Hooks ``adapter``'s updates onto ``blocks`` (global index -> block); active while ``slot`` names it."""
    for index, modules in adapter.weights.items():
        for module, (a, b) in modules.items():
            linear = blocks[index].get_submodule(module)
            hook = getattr(linear, "_nectar_lora", None)
            if hook is None:
                hook = linear._nectar_lora = _LoraHook(slot)
                linear.register_forward_hook(hook)
            elif hook.slot is not slot:
                raise AdapterError(f"block {index} {module} is hooked to another adapter slot")
            hook.updates[adapter.name] = (a, b, adapter.scaling)


class SpanAdapters:
    """The adapters a node serves on its blocks (one slot for all of them); ``use(name)`` around a computation."""

    def __init__(self, adapters: dict[str, LoraAdapter], slot: AdapterSlot):
        self.adapters, self.slot = adapters, slot

    @property
    def names(self) -> list[str]:
        return sorted(self.adapters)

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def use(self, name: str | None):
        if name is not None and name not in self.adapters:
            raise AdapterError(f"adapter {name!r} is not loaded here; loaded: {self.names}")
        return self.slot.use(name)


def load_span_adapters(
    spans: list,
    paths: list[str | os.PathLike],
    *,
    base_names: set[str] = frozenset(),
    max_adapters: int = 16,
    max_bytes: int = 4 * 1024**3,
) -> SpanAdapters:
    """Loads each PEFT LoRA folder in ``paths`` for ``spans`` (``BlockSpan``s of one model, any split) and hooks it
    on their blocks; bounded in count and in bytes held."""
    if len(paths) > max_adapters:
        raise AdapterError(f"{len(paths)} adapters listed, at most {max_adapters} are served: list fewer")
    slot = AdapterSlot()
    blocks = {span.start + i: block for span in spans for i, block in enumerate(span.blocks)}
    if not spans:
        return SpanAdapters({}, slot)
    first = spans[0]
    adapters: dict[str, LoraAdapter] = {}
    held = 0
    for path in paths:
        adapter = load_lora_adapter(
            path,
            blocks=blocks,
            prefixes=first.family.block_prefixes,
            num_model_blocks=first.family.num_blocks(first.config),
            base_names=base_names,
            dtype=first.dtype,
            device=first.device,
        )
        if adapter.name in adapters:
            raise AdapterError(
                f"two adapters are named {adapter.name!r} ({adapters[adapter.name].path}, {adapter.path}): "
                "rename a folder (the name is the folder's)"
            )
        held += adapter.nbytes
        if held > max_bytes:
            raise AdapterError(f"the adapters' weights for these blocks pass {max_bytes} bytes: serve fewer")
        adapters[adapter.name] = adapter
    for adapter in adapters.values():
        attach_adapter(blocks, adapter, slot)
    return SpanAdapters(adapters, slot)


__all__ = [
    "SpanAdapters",
    "adapter_digest",
    "read_adapter_files",
    "load_span_adapters",
    "ADAPTER_NAME",
    "AdapterError",
    "AdapterSlot",
    "LoraAdapter",
    "attach_adapter",
    "check_adapter_name",
    "load_lora_adapter",
]
