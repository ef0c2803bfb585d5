"""A local Anvil devnet with Nectar deployed: ``start_devnet()`` returns a handle whose ``stop()`` ends it cleanly."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from web3 import Web3

from nectar.paths import deployment_path as default_deployment_path

from .accounts import ANVIL_MNEMONIC, dev_accounts
from .artifacts import build_contracts, tool_path
from .client import Chain
from .deploy import DeployParams, deploy_contracts
from .deployment import Deployment

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEVNET_CHAIN_ID = 31337


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for tests that run their own devnet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class DevnetHandle:
    """A running Anvil with the contracts deployed. ``deployment`` is what was written to ``deployment_path``."""

    def __init__(
        self,
        process: subprocess.Popen,
        *,
        rpc_url: str,
        deployment: Deployment,
        deployment_path: Path,
        log_path: Path,
        temp_dir: Path | None = None,
    ):
        self.process = process
        self._temp_dir = temp_dir  # created by start_devnet for the log; removed on stop
        self.rpc_url = rpc_url
        self.deployment = deployment
        self.deployment_path = deployment_path
        self.log_path = log_path

    def chain(self) -> Chain:
        return Chain(self.deployment)

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stops Anvil (SIGTERM, then SIGKILL after ``timeout``) and removes the deployment file it wrote, so no
        reader mistakes a dead chain for a live one."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("anvil did not stop within %.0fs; killing it", timeout)
                self.process.kill()
                self.process.wait()
        try:
            if self.deployment_path.exists() and self._wrote_current_file():
                self.deployment_path.unlink()
        except OSError as exc:
            logger.warning("could not remove %s: %s", self.deployment_path, exc)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        logger.info("devnet on %s stopped", self.rpc_url)

    def _wrote_current_file(self) -> bool:
        # Another devnet may have replaced the file since; only remove our own.
        try:
            return json.loads(self.deployment_path.read_text()).get("rpcUrl") == self.rpc_url
        except (OSError, ValueError):
            return False

    def __enter__(self) -> DevnetHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_for_rpc(process: subprocess.Popen, rpc_url: str, log_path: Path, timeout: float) -> Web3:
    """Waits until *our* anvil listens: its own log says so (another process may already own the port and answer
    RPC calls, which must not be mistaken for ours)."""
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 5}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path.exists() else ""
            raise RuntimeError(
                f"anvil exited with code {process.returncode} (port in use? pick another --port):\n{tail}"
            )
        if "Listening on" in log_path.read_text(errors="replace"):
            try:
                if w3.eth.chain_id == DEVNET_CHAIN_ID:
                    return w3
            except Exception:  # listening but not serving yet
                pass
        time.sleep(0.1)
    raise TimeoutError(f"anvil did not answer on {rpc_url} within {timeout}s; see {log_path}")


def start_devnet(
    *,
    port: int = 8545,
    state_dir: Path | str | None = None,
    deployment_path: Path | str | None = None,
    params: DeployParams | None = None,
    block_time: float | None = None,
    startup_timeout: float = 30.0,
) -> DevnetHandle:
    """Starts Anvil on 127.0.0.1:``port``, deploys the contracts from forge's build, funds the demo accounts and
    writes the deployment file.

    :param state_dir: folder for anvil.log (and the deployment file when ``deployment_path`` is not given);
        default: a fresh temporary folder for the log and ``nectar.paths.deployment_path()`` for the file
    :param deployment_path: where to write the deployment file (overrides the above)
    :param params: contract parameters (delays, fees, stakes); devnet defaults otherwise
    :param block_time: seconds per block; default: a block per transaction (instant mining)
    """
    build_contracts()
    temp_dir = None
    if state_dir is not None:
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        target = Path(deployment_path) if deployment_path else state / "deployment.json"
    else:
        state = temp_dir = Path(tempfile.mkdtemp(prefix="nectar-devnet-"))
        target = Path(deployment_path) if deployment_path else default_deployment_path()
    log_path = state / "anvil.log"
    rpc_url = f"http://{HOST}:{port}"
    cmd = [
        tool_path("anvil"),
        "--host",
        HOST,
        "--port",
        str(port),
        "--chain-id",
        str(DEVNET_CHAIN_ID),
        "--mnemonic",
        ANVIL_MNEMONIC,
        "--accounts",
        str(len(dev_accounts())),
        "--balance",
        "10000",
    ]
    if block_time:
        cmd += ["--block-time", str(block_time)]
    logger.info("starting anvil on %s (log: %s)", rpc_url, log_path)
    with open(log_path, "ab") as log:
        # Own process group: Ctrl-C in a parent terminal reaches us first, and we stop anvil in order.
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        w3 = _wait_for_rpc(process, rpc_url, log_path, startup_timeout)
        deployment = deploy_contracts(w3, rpc_url=rpc_url, accounts=dev_accounts(), params=params or DeployParams())
        deployment.save(target)
    except BaseException:
        process.terminate()
        process.wait(timeout=10)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    logger.info("devnet ready on %s; deployment at %s", rpc_url, target)
    return DevnetHandle(
        process, rpc_url=rpc_url, deployment=deployment, deployment_path=target, log_path=log_path, temp_dir=temp_dir
    )
