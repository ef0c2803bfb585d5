"""The one deployment file: chain id, RPC URL, contract addresses + ABIs, and the devnet's funded demo accounts.

Written by ``nectar devnet`` (``start_devnet``) and read by the node, ledger, client and API through
``load_deployment``. Its default home is ``nectar.paths.deployment_path()`` (``$NECTAR_DEPLOYMENT`` or
``~/.nectar/deployment.json``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nectar.paths import deployment_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class DeploymentNotFound(FileNotFoundError):
    """No deployment file where one was expected."""


@dataclass
class Deployment:
    """Where Nectar's contracts live on one chain. ``contracts`` maps a name (``"Settlement"``...) to
    ``{"address": checksummed, "abi": [...]}``; ``accounts`` lists the devnet's demo accounts (role, address, key)."""

    chain_id: int
    rpc_url: str
    contracts: dict[str, dict[str, Any]]
    accounts: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    deployed_at_block: int = 0
    path: Path | None = None

    def address_of(self, name: str) -> str:
        if name not in self.contracts:
            raise KeyError(f"no contract named {name!r} in the deployment; known: {', '.join(self.contracts)}")
        return self.contracts[name]["address"]

    def abi_of(self, name: str) -> list[dict]:
        return self.contracts[name]["abi"]

    def accounts_with_role(self, role: str) -> list[dict[str, Any]]:
        """Demo accounts of one role (``deployer``, ``ledger``, ``verifier``, ``treasury``, ``node``, ``client``)."""
        return [a for a in self.accounts if a["role"] == role]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "chainId": self.chain_id,
            "rpcUrl": self.rpc_url,
            "deployedAtBlock": self.deployed_at_block,
            "eip712Domain": {
                "name": "Nectar",
                "version": "1",
                "chainId": self.chain_id,
                "verifyingContract": self.address_of("Settlement"),
            },
            "contracts": self.contracts,
            "accounts": self.accounts,
            "params": self.params,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, path: Path | None = None) -> Deployment:
        try:
            return cls(
                chain_id=int(data["chainId"]),
                rpc_url=data["rpcUrl"],
                contracts=data["contracts"],
                accounts=data.get("accounts", []),
                params=data.get("params", {}),
                deployed_at_block=int(data.get("deployedAtBlock", 0)),
                path=path,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"malformed deployment file {path}: {exc!r}; restart `nectar devnet` to rewrite it"
            ) from exc

    def save(self, path: Path | str | None = None) -> Path:
        """Writes the file atomically (readers never see half a file)."""
        target = Path(path) if path is not None else (self.path or deployment_path())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, target)
        self.path = target
        logger.info("deployment written to %s", target)
        return target


def load_deployment(path: Path | str | None = None) -> Deployment:
    """Reads the deployment file (default: ``nectar.paths.deployment_path()``)."""
    target = Path(path) if path is not None else deployment_path()
    if not target.exists():
        raise DeploymentNotFound(
            f"no deployment file at {target}: start a devnet with `nectar devnet` "
            f"(or point NECTAR_DEPLOYMENT at an existing deployment.json)"
        )
    try:
        data = json.loads(target.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"deployment file {target} is not JSON ({exc}); restart `nectar devnet`") from exc
    return Deployment.from_json(data, path=target)
