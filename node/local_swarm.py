"""Starts a swarm of real processes on 127.0.0.1 (a bootstrap peer and nodes): used by tests, benchmarks and
``nectar demo``. Each process is ``python -m nectar.cli ...``, exactly what an operator would run."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ADDRESS_RE = re.compile(r"^(/(ip4|ip6|dns4|dns6|dns)/\S+/p2p/\S+)$")  # a relayed node's: .../p2p-circuit/p2p/ID


@dataclass
class SwarmProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    address: str = ""
    eth_address: str = ""
    lines: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class LocalSwarm:
    """A context manager; ``add_node`` returns once the node serves (its address line has been printed).

    :param workdir: where logs and keys go (a temp dir by default)
    """

    def __init__(
        self, *, workdir: Path | None = None, env: dict | None = None, start_timeout: float = 120, direct: bool = True
    ):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="nectar-swarm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.env.setdefault("NECTAR_HOME", str(self.workdir / "home"))
        self.start_timeout = start_timeout
        self.direct = direct  # nodes also listen on a loopback TCP lane (nectar.wire.direct)
        self.bootstrap: SwarmProcess | None = None
        self.nodes: list[SwarmProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return [self.bootstrap.address] if self.bootstrap else []

    def _spawn(self, name: str, args: Sequence[str]) -> SwarmProcess:
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "nectar.cli", *args],
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=self.env,
            text=True,
            start_new_session=True,
        )
        proc = SwarmProcess(name, process, log_path)
        ready = threading.Event()

        def read_stdout():
            for line in process.stdout:
                line = line.rstrip("\n")
                proc.lines.append(line)
                with open(log_path, "a") as f:
                    f.write(line + "\n")
                if not proc.eth_address:
                    match = re.search(r"receipts signed by (0x[0-9a-fA-F]{40})", line)
                    if match:
                        proc.eth_address = match.group(1)
                if not proc.address and ADDRESS_RE.match(line):
                    proc.address = line
                    ready.set()
            ready.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        try:
            started = ready.wait(self.start_timeout)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM in nectar demo): not registered yet, so stop it here
            self._kill(proc)
            raise
        if not started or not proc.address:
            tail = proc.log()[-3000:]
            self._kill(proc)
            raise RuntimeError(f"{name} did not start within {self.start_timeout}s; its log:\n{tail}")
        return proc

    def start_bootstrap(self, extra_args: Sequence[str] = ()) -> SwarmProcess:
        self.bootstrap = self._spawn("dht", ["dht", "--host", "127.0.0.1", *extra_args])
        return self.bootstrap

    def add_node(
        self,
        model: str,
        *,
        blocks: tuple[int, int] | None = None,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        own_keys: bool = True,
    ) -> SwarmProcess:
        """:param own_keys: pass --name and --key-dir (under ``workdir``); False starts the node as an operator who
        gives neither would (it takes a free identity under ``$NECTAR_HOME/nodes``)"""
        if self.bootstrap is None:
            self.start_bootstrap()
        name = name or f"node{len(self.nodes)}"
        args = ["node", "--model", model, "--host", "127.0.0.1", "--initial-peers", *self.initial_peers]
        if own_keys:
            args += ["--name", name, "--key-dir", str(self.workdir / "keys" / name)]
        if blocks is not None:
            args += ["--blocks", f"{blocks[0]}:{blocks[1]}"]
        if self.direct:
            args += ["--direct-port", "0"]
        node = self._spawn(name, [*args, *extra_args])
        self.nodes.append(node)
        return node

    @staticmethod
    def _kill(proc: SwarmProcess, sig=signal.SIGKILL) -> None:
        """SIGKILL takes the whole process group down at once; SIGTERM goes to the main process only, so it can say
        goodbye through its own DHT and P2P daemons before they stop (the group is reaped afterwards)."""
        if proc.alive():
            try:
                if sig == signal.SIGKILL:
                    os.killpg(proc.process.pid, sig)
                else:
                    proc.process.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.process.pid, signal.SIGKILL)  # leftovers of the group, e.g. p2pd daemons
        except (ProcessLookupError, PermissionError):
            pass
        proc.process.wait()

    def kill(self, node: SwarmProcess) -> None:
        """Kills a node abruptly (SIGKILL): no goodbye announcement, like a crashed machine."""
        self._kill(node)

    def stop(self, node: SwarmProcess) -> None:
        self._kill(node, signal.SIGTERM)

    def wait_for_blocks(self, model: str, num_blocks: int, *, timeout: float = 60, min_nodes: int = 1) -> None:
        """Waits until every block of ``model`` is announced ONLINE by at least ``min_nodes`` nodes."""
        from nectar.models import model_id_of
        from nectar.wire.announce import ServerState
        from nectar.wire.dht import ClientRuntime
        from nectar.wire.swarm import read_swarm

        model_id = model_id_of(model)
        runtime = ClientRuntime(self.initial_peers)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                counts = read_swarm(runtime, model_id, num_blocks).coverage((ServerState.ONLINE,))
                if min(counts) >= min_nodes:
                    return
                time.sleep(0.5)
            raise TimeoutError(
                f"blocks of {model_id} not all served by {min_nodes} node(s) within {timeout}s: {counts}"
            )
        finally:
            runtime.shutdown()

    def close(self) -> None:
        """Stops every process at once (each says goodbye on its own), the bootstrap peer last."""
        threads = [threading.Thread(target=self._kill, args=(proc, signal.SIGTERM)) for proc in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.bootstrap is not None:
            self._kill(self.bootstrap, signal.SIGTERM)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
