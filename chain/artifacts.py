"""Forge's build output and the npm-installed Foundry tools: where they are and how to read them.

ABIs and bytecode are always read from ``contracts/out/<File>.sol/<Contract>.json`` (forge's artifacts), never copied.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from nectar.settings import current

logger = logging.getLogger(__name__)

# The contracts the devnet deploys, in deployment order (file stem == contract name).
CONTRACT_NAMES = ("Credits", "Escrow", "NodeRegistry", "Settlement", "Slashing")
ABSTRACT_NAMES = ("Escrow",)  # ABI only: the vault is Settlement's base, deployed as part of it


def repo_root() -> Path:
    """The repository holding foundry.toml (chain/ lives at its top level), or ``NECTAR_REPO_ROOT``."""
    return current().repo_root or Path(__file__).resolve().parents[1]


def out_dir() -> Path:
    """Forge's build output: ``NECTAR_CONTRACTS_OUT``, else ``contracts/out`` of the repository."""
    return current().contracts_out or repo_root() / "contracts" / "out"


_NPM_PLATFORMS = {
    ("linux", "x86_64"): "linux-amd64",
    ("linux", "aarch64"): "linux-arm64",
    ("darwin", "x86_64"): "darwin-amd64",
    ("darwin", "arm64"): "darwin-arm64",
}


def tool_path(name: str) -> str:
    """Path of ``anvil``, ``forge`` or ``cast`` from the npm install, else from $PATH. The platform binary is used
    directly rather than npm's node wrapper: one process to signal and stop, no node at run time."""
    modules = repo_root() / "node_modules"
    platform = _NPM_PLATFORMS.get((sys.platform, os.uname().machine))
    binary = modules / "@foundry-rs" / f"{name}-{platform}" / "bin" / name
    if platform and binary.exists():
        return str(binary)
    local = modules / ".bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found in {local.parent} or on PATH: run scripts/setup.d/20-foundry.sh (npm ci) first"
    )


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict]
    bytecode: str  # 0x-prefixed creation code


@cache
def _load(path: Path, mtime: float) -> Artifact:  # mtime in the key: a rebuild invalidates the cache
    data = json.loads(path.read_text())
    return Artifact(name=path.stem, abi=data["abi"], bytecode=data["bytecode"]["object"])


def load_artifact(name: str) -> Artifact:
    path = out_dir() / f"{name}.sol" / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no forge artifact at {path}: run `forge build` at {repo_root()} first")
    return _load(path, path.stat().st_mtime)


def artifacts_present() -> bool:
    return all((out_dir() / f"{n}.sol" / f"{n}.json").exists() for n in CONTRACT_NAMES)


def build_contracts(*, force: bool = False) -> None:
    """Runs ``forge build`` (fast when up to date; solcjs makes a cold build take a few seconds to a minute)."""
    if artifacts_present() and not force:
        return
    logger.info("building contracts with forge (solcjs) ...")
    result = subprocess.run([tool_path("forge"), "build"], cwd=repo_root(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"forge build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    logger.info("contracts built into %s", out_dir())
