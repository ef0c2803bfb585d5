"""A real ledger deployment for tests: Anvil (``nectar.chain.start_devnet``), ``nectar ledger`` and ``nectar worker``
as subprocesses sharing one NECTAR_HOME, database and broker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from nectar.chain.devnet import start_devnet
from tests.ledger.utils import Party, free_port, start_nectar, wait_for, wait_http


class LedgerDeployment:
    def __init__(self, home: Path, *, database_url: str, broker_url: str):
        self.home, self.database_url, self.broker_url = home, database_url, broker_url
        self.deployment_path = home / "deployment.json"
        self.devnet = start_devnet(port=free_port(), state_dir=home / "devnet", deployment_path=self.deployment_path)
        self.chain = self.devnet.chain()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ledger = self.worker = None
        accounts = self.chain.deployment.accounts
        self.nodes = [Party(a["privateKey"]) for a in accounts if a["role"] == "node"]
        self.clients = [Party(a["privateKey"]) for a in accounts if a["role"] == "client"]
        self.domain = self.chain.eip712_domain()
        self.register_nodes()

    def register_nodes(self) -> None:
        """The devnet node accounts, registered with the minimum stake (the ledger refuses vouchers to unstaked
        nodes); under placeholder peer ids: ``SwarmMarket.add_node`` re-points one at its real node's peer id."""
        min_stake = self.chain.deployment.params["min_stake"]
        for index, node in enumerate(self.nodes):
            if not self.chain.node_info(node.address)["registered"]:
                self.chain.register_node(node.key, f"devnet-node-{index}", min_stake)

    def env(self, **extra) -> dict:
        base = {
            "NECTAR_HOME": str(self.home),
            "NECTAR_DEPLOYMENT": str(self.deployment_path),
            "NECTAR_LEDGER_DATABASE_URL": self.database_url,
            "NECTAR_LEDGER_BROKER_URL": self.broker_url,
            "NECTAR_LEDGER_DEPLOYMENT_PATH": str(self.deployment_path),
            "NECTAR_LEDGER_EPOCH_SECONDS": "1500",  # tests close epochs by hand; under the unlock delay (checked)
            "NECTAR_LEDGER_EXIT_POLL_SECONDS": "3600",  # no early settlement on withdrawals unless a test asks
            "NECTAR_LEDGER_EPOCH_LEASE_SECONDS": "3",
            "NECTAR_LEDGER_CRASH_MARKER": str(self.home / "crash"),
        }
        return {**base, **{f"NECTAR_LEDGER_{k.upper()}": str(v) for k, v in extra.items()}}

    def start_ledger(self) -> None:
        self.ledger = start_nectar(
            "ledger", ["--port", str(self.port), "--log-level", "warning"], self.env(), self.home / "ledger.log"
        )
        wait_http(f"{self.url}/health", process=self.ledger)

    def start_worker(self, **settings) -> None:
        log = self.home / "worker.log"
        offset = log.stat().st_size if log.exists() else 0  # the log is appended to: a restart must not see old lines

        def started() -> bool:
            with open(log, "rb") as f:
                f.seek(offset)
                return b"ready" in f.read() or self.worker.poll() is not None

        self.worker = start_nectar("worker", ["--log-level", "INFO"], self.env(**settings), log)
        wait_for(started, 120, "the worker to start")
        assert self.worker.poll() is None, log.read_text()[-3000:]

    @staticmethod
    def kill9(process) -> None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        for process in (self.worker, self.ledger):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except Exception:
                    self.kill9(process)
        self.devnet.stop()

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def close_epoch(self) -> dict:
        with self.http() as h:
            response = h.post("/v1/epochs/close", headers={"Authorization": "Bearer nectar-devnet-admin"})
            assert response.status_code == 200, response.text
            return response.json()

    def epoch(self, number: int) -> dict:
        with self.http() as h:
            return {e["number"]: e for e in h.get("/v1/epochs").json()}[number]

    def wait_settled(self, number: int, timeout: float = 120) -> dict:
        def settled():
            e = self.epoch(number)
            return e if e["status"] == "settled" else None

        return wait_for(settled, timeout, f"epoch {number} to settle (see {self.home}/worker.log)", interval=0.5)

    def marker(self, name: str) -> Path:
        return (self.home / "crash").with_suffix(f".{name}")


def worker_log_tail(home: Path) -> str:
    return (home / "worker.log").read_text(errors="ignore")[-4000:]


__all__ = ["LedgerDeployment", "worker_log_tail", "time"]
