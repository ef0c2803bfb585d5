"""The EIP-712 signing domain of a deployment: the one place that reads it from the deployment file.

``nectar.wire`` never reads files: whoever builds a receipt signer, a wallet or a verifier (node, client, ledger,
API) calls ``domain_from_deployment`` and passes the domain down.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nectar.paths import deployment_path
from nectar.wire.eip712 import DEVNET_CHAIN_ID, ZERO_ADDRESS, make_domain

logger = logging.getLogger(__name__)


def domain_from_deployment(path: str | Path | None = None, *, strict: bool = False) -> dict:
    """The domain of the deployment file at ``path`` (default ``nectar.paths.deployment_path()``); chainId 31337 and
    the zero address when there is no file. An unreadable file gives the same default with a warning, or raises
    ValueError when ``strict``."""
    path = Path(path) if path is not None else deployment_path()
    if not path.exists():
        return make_domain(DEVNET_CHAIN_ID, ZERO_ADDRESS)
    try:
        data = json.loads(path.read_text())
        chain_id = int(data.get("chainId", data.get("chain_id", DEVNET_CHAIN_ID)))
        settlement = data.get("contracts", {}).get("Settlement", data.get("settlement", ZERO_ADDRESS))
        if isinstance(settlement, dict):
            settlement = settlement["address"] if strict else settlement.get("address", ZERO_ADDRESS)
        return make_domain(chain_id, settlement)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        if strict:
            raise ValueError(f"the deployment file {path} is unreadable ({e}): rewrite it with `nectar devnet`") from e
        logger.warning(f"Ignoring unreadable deployment file {path} ({e}); using the devnet default domain")
    return make_domain(DEVNET_CHAIN_ID, ZERO_ADDRESS)


DEFAULT_MAX_EVIDENCE_AGE = 43_200  # s: the contracts' default (nectar.chain.deploy.DeployParams)


def max_evidence_age_from_deployment(path: str | Path | None = None) -> int:
    """How long (s) the deployment's chain accepts a receipt as double-sign evidence: a node remembers every work
    key it signed for this long (``nectar.node.signed_work``). The contracts' default without a readable file."""
    path = Path(path) if path is not None else deployment_path()
    try:
        age = json.loads(path.read_text()).get("params", {}).get("max_evidence_age", DEFAULT_MAX_EVIDENCE_AGE)
        return int(age) if int(age) > 0 else DEFAULT_MAX_EVIDENCE_AGE
    except (OSError, ValueError, TypeError, AttributeError):
        return DEFAULT_MAX_EVIDENCE_AGE
