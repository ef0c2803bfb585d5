"""The process-wide runtime settings: every ``NECTAR_*`` knob that package code reads, in one frozen object.

Read once, at the entry point: the ``nectar`` command calls ``configured()`` before it runs a subcommand; code asks
``current()`` (``current().cpu_blas``) instead of ``os.environ``. A library caller that never configures (a script
calling ``DistributedModelForCausalLM.from_pretrained``, a test) gets a default read lazily from the environment and
cached; it is read again only when one of the variables changes, so a test or notebook that sets one sees it.
Nothing here or in its readers touches the environment at import time, and nothing writes it: a value for this
process is ``configure(name=value)``, one for a child process goes into that child's ``env=`` dict.

The ledger and the API have their own pydantic settings (``NECTAR_LEDGER_*``, ``NECTAR_API_*``); a node's and a
client's are ``NodeConfig`` and ``ClientConfig``. ``docs/configuration.md`` lists them all
(``python scripts/gen_config_docs.py`` writes it from these classes).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RuntimeSettings", "SettingsError", "configure", "configured", "current", "reset"]

_CHOICES = {
    "event_loop": ("auto", "uvloop", "asyncio"),
    "cpu_blas": ("auto", "torch", "openblas", "native"),
    "greedy_head": ("auto", "bf16", "int8", "off"),
    "native_decode": ("auto", "on", "off"),
    "decode_route": ("triton", "eager", "compiled"),
    "nf4_kernel": ("triton", "bitsandbytes"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}
_ALIASES = {"cpu_blas": {"mkl": "torch"}}  # PyTorch's CPU products are MKL's
_TRUE, _FALSE = ("auto", "on", "1", "true", "yes"), ("off", "0", "false", "no")
_PATHS = ("home", "deployment", "swarm", "kernel_cache", "repo_root", "contracts_out")


class SettingsError(ValueError):
    """Variables with values Nectar cannot use; the message names each and the values it takes (``args[1]``: the
    problems one by one)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _explain(problems: list[str]) -> str:
    return "; ".join(problems) + " (set each to one of these, or unset it for the default)"


def _one_of(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


def _default_home() -> Path:
    return Path.home() / ".nectar"


_KERNELS = "$XDG_CACHE_HOME/nectar/kernels (~/.cache/nectar/kernels)"


def _default_kernel_cache() -> Path:
    return Path.home() / ".cache" / "nectar" / "kernels"


@dataclass(frozen=True)
class RuntimeSettings:
    """Process-wide knobs; one instance per process (``current()``). Each field's variable is ``NECTAR_<NAME>``."""

    home: Path = field(default_factory=_default_home, metadata={"default_text": "~/.nectar"})  # folder for node keys,
    # converted models, the SQLite databases and the deployment file
    deployment: Path | None = None  # deployment file of `nectar devnet` (contracts, ABIs, EIP-712 domain);
    # none = HOME/deployment.json
    initial_peers: tuple[str, ...] = ()  # multiaddrs of swarm peers (space or comma separated) used where a command
    # or client is given none
    swarm: Path | None = None  # a swarm file (TOML, JSON or YAML: name, initial_peers, optionally model and
    # ledger_url) used where a command is given no --initial-peers or --swarm (it wins over NECTAR_INITIAL_PEERS)
    log_level: str | None = None  # DEBUG, INFO, WARNING or ERROR for every command; none = each command's own
    # (--log-level and -v win)
    event_loop: str = "auto"  # the node's and client's event loop: auto (uvloop where installed), uvloop or asyncio
    cpu_blas: str = "auto"  # CPU matrix products: auto (timed per row count at start), torch (MKL), openblas or
    # native (nectar's C kernel); mkl = torch
    greedy_head: str = "auto"  # greedy decoding's LM head: auto (a low-precision pass where it measured faster),
    # bf16, int8 or off (float32 logits)
    native: bool = True  # compile and use nectar's C kernels (auto/on/off; off = PyTorch everywhere)
    native_decode: str = "auto"  # the C decode layer for one-token steps on CPU: auto (where measured faster), on
    # or off
    native_attention: bool = True  # a CPU node's decode rounds of several sessions attend in C over each session's
    # own cache (off: PyTorch's attention over the caches padded into one batch)
    cuda_graphs: bool = True  # a GPU node records its decode rounds as CUDA graphs (off: eager rounds, to compare)
    decode_route: str = "triton"  # the kernels of a GPU node's recorded float16/bfloat16 decode rounds: triton
    # (fused Triton kernels; PyTorch's where Triton is missing or cannot build them), eager (PyTorch's) or compiled
    # (torch.compile)
    nf4_kernel: str = "bitsandbytes"  # a GPU node's nf4 products of up to 16 rows: bitsandbytes (its kernels) or
    # triton (one Triton kernel reading the same codes; PyTorch's path where Triton cannot build it)
    nf4_tiles: str | None = None  # the nf4 Triton kernel's tiles as JSON, as benchmarks/quant/bench_nf4_kernel.py
    # prints the fastest for a GPU; none = the built-in ones
    kernel_cache: Path = field(default_factory=_default_kernel_cache, metadata={"default_text": _KERNELS})  # folder
    # of the compiled C kernels, shared by the processes of a machine
    compiler: str | None = field(default=None, metadata={"env": "CC"})  # C compiler for the kernels; none = cc,
    # gcc or clang from PATH
    trace: str | None = None  # a node writes its round timeline to this JSON-lines file as it stops ({pid}
    # becomes its process id); none = off
    repo_root: Path | None = None  # the checkout holding foundry.toml and node_modules; none = the one nectar
    # runs from
    contracts_out: Path | None = None  # forge's build output (ABIs, bytecode); none = REPO_ROOT/contracts/out

    def __post_init__(self) -> None:
        for name in _PATHS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if isinstance(self.initial_peers, str):
            object.__setattr__(self, "initial_peers", _split_peers(self.initial_peers))
        problems = [
            f"{env_name(name)} must be {_one_of(choices)}, got {getattr(self, name)!r}"
            for name, choices in _CHOICES.items()
            if getattr(self, name) not in (None, *choices)
        ]
        if problems:
            raise SettingsError(_explain(problems), problems)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RuntimeSettings:
        """The settings ``env`` (usually ``os.environ``) asks for; unset or empty variables keep their defaults.
        Raises ``SettingsError`` naming every variable with a value it cannot use."""
        values: dict = {}
        problems: list[str] = []
        for f in dataclasses.fields(cls):
            text = (env.get(env_name(f.name)) or "").strip()
            if not text:
                continue
            if f.name in _CHOICES:
                text = text.upper() if f.name == "log_level" else text.lower()
                values[f.name] = _ALIASES.get(f.name, {}).get(text, text)
            elif f.type in ("bool", bool):
                if text.lower() in _TRUE + _FALSE:
                    values[f.name] = text.lower() in _TRUE
                else:
                    problems.append(
                        f"{env_name(f.name)} must be auto, on or off (or 1/0, true/false, yes/no), got {text!r}"
                    )
            elif f.name == "initial_peers":
                values[f.name] = _split_peers(text)
            else:
                values[f.name] = text
        if "kernel_cache" not in values and (env.get("XDG_CACHE_HOME") or "").strip():
            values["kernel_cache"] = Path(env["XDG_CACHE_HOME"].strip()) / "nectar" / "kernels"
        try:
            settings = cls(**values)
        except SettingsError as error:
            problems = [*error.args[1], *problems]
        if problems:
            raise SettingsError(_explain(problems), problems)
        return settings

    @staticmethod
    def env_var(name: str) -> str:
        """The environment variable of the field ``name`` (``cpu_blas`` -> ``NECTAR_CPU_BLAS``)."""
        return env_name(name)

    @property
    def trace_path(self) -> Path | None:
        """``trace`` for this process (``{pid}`` replaced by its id), or None when tracing is off."""
        return Path(self.trace.replace("{pid}", str(os.getpid()))) if self.trace else None

    @property
    def deployment_path(self) -> Path:
        """The deployment file: ``deployment``, else ``home/deployment.json``."""
        return self.deployment if self.deployment is not None else self.home / "deployment.json"


def env_name(name: str) -> str:
    """The environment variable of the field ``name`` (``cpu_blas`` -> ``NECTAR_CPU_BLAS``)."""
    override = _FIELDS[name].metadata.get("env") if name in _FIELDS else None
    return override or f"NECTAR_{name.upper()}"


def _split_peers(text: str) -> tuple[str, ...]:
    return tuple(word for word in text.replace(",", " ").split() if word)


_FIELDS = {f.name: f for f in dataclasses.fields(RuntimeSettings)}
_WATCHED = tuple(env_name(name) for name in _FIELDS) + ("XDG_CACHE_HOME", "HOME")  # what a lazy default depends on
_lock = threading.Lock()
_pinned: RuntimeSettings | None = None  # set by configure(): the entry point's settings
_lazy: tuple[tuple, RuntimeSettings] | None = None  # (the variables it was read from, the settings)


def current() -> RuntimeSettings:
    """This process's settings: the ones ``configure`` set, else those of the environment (read on first use and
    cached). Raises ``SettingsError`` if a variable has a value Nectar cannot use."""
    global _lazy
    if _pinned is not None:
        return _pinned
    key = tuple(os.environ.get(name) for name in _WATCHED)
    cached = _lazy
    if cached is None or cached[0] != key:
        cached = (key, RuntimeSettings.from_env(os.environ))
        _lazy = cached
    return cached[1]


def configure(settings: RuntimeSettings | None = None, **changes) -> RuntimeSettings:
    """Sets this process's settings: ``settings`` (default: ``current()``) with ``changes`` (field=value) applied.
    Entry points call it once; ``configure(deployment=path)`` replaces writing ``NECTAR_DEPLOYMENT``."""
    global _pinned
    with _lock:
        base = settings if settings is not None else current()
        _pinned = dataclasses.replace(base, **changes) if changes else base
        return _pinned


@contextmanager
def configured(settings: RuntimeSettings | None = None, **changes) -> Iterator[RuntimeSettings]:
    """``configure`` for the duration of a block (a command's run, a test), then back to what was there before."""
    global _pinned
    previous = _pinned
    try:
        yield configure(settings, **changes)
    finally:
        _pinned = previous


def reset() -> None:
    """Forgets configured and cached settings: the next ``current()`` reads the environment again."""
    global _pinned, _lazy
    with _lock:
        _pinned = _lazy = None
