"""Chain fixtures: one real Anvil devnet per test module (random free port), with Nectar deployed."""

from __future__ import annotations

import pytest

from nectar.chain import Chain, free_port, start_devnet


def _start(state_dir):
    # free_port() can race with another process taking the port before anvil binds it: try a few.
    for attempt in range(3):
        try:
            return start_devnet(port=free_port(), state_dir=state_dir)
        except RuntimeError:
            if attempt == 2:
                raise


@pytest.fixture(scope="module")
def devnet(tmp_path_factory):
    handle = _start(tmp_path_factory.mktemp("devnet"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def chain(devnet) -> Chain:
    return devnet.chain()


@pytest.fixture(scope="module")
def roles(devnet) -> dict[str, list[dict]]:
    """Demo accounts by role: deployer, ledger, verifier, treasury, node (3), client (3)."""
    out: dict[str, list[dict]] = {}
    for account in devnet.deployment.accounts:
        out.setdefault(account["role"], []).append(account)
    return out
