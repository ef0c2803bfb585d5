"""Starting the API as part of a local market (``nectar demo``, benchmarks, tests): ``nectar api serve`` and
``nectar api worker`` as subprocesses, a funded demo account, and a request a user can copy.

    env = api_environment(home=workdir, model="smollm2-135m", initial_peers=swarm.initial_peers,
                          ledger_url=ledger_url, deployment_path=deployment_path, private_key=gateway_key)
    api = ApiProcess(env=env, log_dir=workdir, worker=True)
    account = demo_account(api.url, credits="10")          # sign-up + devnet faucet
    print(example_request(api.url, account["api_key"], model_name))
    ...
    api.stop()
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_environment(
    *,
    home: Path,
    model: str,
    initial_peers: list[str],
    database_url: str | None = None,
    broker_url: str | None = None,
    ledger_url: str | None = None,
    deployment_path: Path | None = None,
    private_key: str | None = None,
    **settings,
) -> dict:
    """``NECTAR_API_*`` variables for an API (and its worker) on embedded defaults under ``home``; ``settings`` are
    further Settings fields (``price_per_token=20`` -> ``NECTAR_API_PRICE_PER_TOKEN=20``)."""
    home = Path(home)
    env = {
        "NECTAR_HOME": str(home),
        "NECTAR_API_MODELS": str(model),
        "NECTAR_API_INITIAL_PEERS": " ".join(initial_peers),
        "NECTAR_API_DATABASE_URL": database_url or f"sqlite:///{home / 'api.db'}",
        "NECTAR_API_BROKER_URL": broker_url or f"sqla+sqlite:///{home / 'api-broker.db'}",
        "PYTHONUNBUFFERED": "1",
    }
    if deployment_path is not None:
        env["NECTAR_DEPLOYMENT"] = env["NECTAR_API_DEPLOYMENT_PATH"] = str(deployment_path)
    if ledger_url:
        env["NECTAR_API_LEDGER_URL"] = ledger_url
    if private_key:
        env["NECTAR_API_PRIVATE_KEY"] = private_key
    env.update({f"NECTAR_API_{name.upper()}": str(value) for name, value in settings.items()})
    return env


class ApiProcess:
    """``nectar api serve`` on a free port (and ``nectar api worker`` if ``worker``); returns once both are ready.

    :param env: variables from ``api_environment`` (added to this process's environment)
    :param log_dir: where ``api.log`` and ``api-worker.log`` go
    :param port: default: a free port
    :param worker: also start the fine-tuning worker
    :param start_timeout: seconds to wait for each process
    """

    running: weakref.WeakSet[ApiProcess] = weakref.WeakSet()  # started and not stopped: what a failed test reports

    def __init__(
        self, *, env: dict, log_dir: Path, port: int | None = None, worker: bool = False, start_timeout: float = 120.0
    ):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.worker_process: subprocess.Popen | None = None
        self.process = self._spawn(["api", "serve", "--port", str(self.port)], self.log_dir / "api.log")
        try:
            self._wait(
                lambda: _answers(f"{self.url}/health"),
                self.process,
                self.log_dir / "api.log",
                start_timeout,
                "nectar api",
            )
            if worker:
                log = self.log_dir / "api-worker.log"
                self.worker_process = self._spawn(["api", "worker"], log)
                self._wait(
                    lambda: "ready" in log.read_text(errors="replace"),
                    self.worker_process,
                    log,
                    start_timeout,
                    "nectar api worker",
                )
        except BaseException:
            self.stop()
            raise
        ApiProcess.running.add(self)

    def _spawn(self, args: list[str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "nectar.cli", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @staticmethod
    def _wait(ready, process: subprocess.Popen, log_path: Path, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with code {process.returncode}; the end of {log_path}:\n"
                    f"{log_path.read_text(errors='replace')[-3000:]}"
                )
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"{what} was not ready within {timeout:.0f}s; see {log_path}")

    def log(self) -> str:
        return (self.log_dir / "api.log").read_text(errors="replace")

    def describe(self, tail: int = 6000) -> str:
        """Whether it still runs (else its exit code, a negative one naming the signal) and the end of its log."""
        code = self.process.poll()
        state = "running" if code is None else f"exited with code {code}"
        return f"nectar api on {self.url}, {state}; the end of {self.log_dir / 'api.log'}:\n{self.log()[-tail:]}"

    def stop(self, timeout: float = 20.0) -> None:
        ApiProcess.running.discard(self)
        for process in (self.worker_process, self.process):
            if process is None:
                continue
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
            try:  # what it started and left behind, e.g. if it crashed: its DHT process and p2pd daemons
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> ApiProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def demo_account(url: str, *, name: str = "demo", credits: str | None = "10") -> dict:
    """Signs up (open on a devnet) and, with ``credits``, funds the account from the devnet faucet.
    Returns ``{"api_key", "account"}``."""
    with httpx.Client(base_url=url, timeout=60) as http:
        created = http.post("/v1/accounts", json={"name": name})
        created.raise_for_status()
        body = created.json()
        if credits is not None:
            funded = http.post(
                "/v1/account/faucet", json={"credits": credits}, headers={"Authorization": f"Bearer {body['api_key']}"}
            )
            if funded.status_code != 200:
                raise RuntimeError(f"the faucet refused: {funded.text}")
            body["account"] = http.get("/v1/account", headers={"Authorization": f"Bearer {body['api_key']}"}).json()
    return {"api_key": body["api_key"], "account": body["account"]}


def example_request(url: str, api_key: str, model: str) -> str:
    """A chat request to copy into a shell, and the same with the official openai client."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}
    )
    return (
        f"curl {url}/v1/chat/completions -H 'Authorization: Bearer {api_key}' "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}\n\n"
        f"python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{api_key}'); "
        f"print(c.chat.completions.create(model='{model}', max_tokens=32, "
        f"messages=[{{'role': 'user', 'content': 'Hi!'}}])"
        f'.choices[0].message.content)"'
    )
