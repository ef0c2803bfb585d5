"""`nectar devnet` and start_devnet as processes: foreground run, clean stop on SIGTERM, the deployment file's
contents and life cycle, and clear errors when there is no deployment or the port is taken."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from nectar.chain import Chain, DeploymentNotFound, free_port, load_deployment, start_devnet


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_runs_until_sigterm_and_cleans_up(tmp_path, monkeypatch):
    port = free_port()
    deployment = tmp_path / "deployment.json"
    env = {**os.environ, "NECTAR_DEPLOYMENT": str(deployment), "NECTAR_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nectar.cli", "devnet", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}" in output, output
        assert str(deployment) in output
        data = json.loads(deployment.read_text())
        assert data["rpcUrl"] == f"http://127.0.0.1:{port}" and data["chainId"] == 31337
        assert set(data["contracts"]) == {"Credits", "Escrow", "NodeRegistry", "Settlement", "Slashing"}
        assert all(c["abi"] and c["address"].startswith("0x") for c in data["contracts"].values())
        assert {a["role"] for a in data["accounts"]} >= {"deployer", "ledger", "verifier", "node", "client"}
        assert data["eip712Domain"]["verifyingContract"] == data["contracts"]["Settlement"]["address"]

        monkeypatch.setenv("NECTAR_DEPLOYMENT", str(deployment))
        chain = Chain(load_deployment())  # NECTAR_DEPLOYMENT is honoured by the default path
        client = chain.deployment.accounts_with_role("client")[0]["address"]
        assert chain.credit_balance(client) > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "devnet stopped" in rest
    assert not _port_open(port)
    assert not deployment.exists()  # a stopped devnet leaves no file pointing at a dead chain


def test_start_devnet_handle(tmp_path):
    with start_devnet(port=free_port(), state_dir=tmp_path) as handle:
        assert handle.is_running()
        assert handle.deployment_path == tmp_path / "deployment.json"
        assert (tmp_path / "anvil.log").exists()
        assert Chain.from_deployment(handle.deployment_path).is_connected()
    assert not handle.is_running()


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="port in use"):
            start_devnet(port=port, state_dir=tmp_path, startup_timeout=20)


def test_missing_deployment_names_the_fix(tmp_path):
    with pytest.raises(DeploymentNotFound, match="nectar devnet"):
        load_deployment(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_deployment(tmp_path / "bad.json")
