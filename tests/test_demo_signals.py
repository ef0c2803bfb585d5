"""``nectar demo`` stopped with SIGTERM stops every process it started, as Ctrl-C does (issue 24: eight children
survived SIGTERM). The signal comes while the market is being built, with a devnet, the ledger, its worker and swarm
processes already running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def _started_for(tmp_path) -> list[psutil.Process]:
    """Processes whose environment names this test's NECTAR_HOME: every process the demo started."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("NECTAR_HOME") == str(tmp_path / "home"):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_sigterm_stops_the_demo_and_every_child(tmp_path):
    from tests.api.utils import make_chat_checkpoint

    checkpoint = make_chat_checkpoint(tmp_path / "tiny-chat")
    env = {**os.environ, "NECTAR_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "demo.log", "wb")
    demo = subprocess.Popen(
        [sys.executable, "-m", "nectar.cli", "demo", "--model", str(checkpoint), "--workdir", str(tmp_path / "w")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen: dict[int, psutil.Process] = {}
    try:
        parent = psutil.Process(demo.pid)
        deadline = time.monotonic() + 300
        # wait for the swarm to be starting: Anvil, the ledger, its worker and swarm processes are up by then
        while time.monotonic() < deadline and demo.poll() is None:
            for child in parent.children(recursive=True):
                seen.setdefault(child.pid, child)
            if len(seen) >= 5 and "starting a swarm" in (tmp_path / "demo.log").read_text(errors="replace"):
                break
            time.sleep(0.5)
        assert demo.poll() is None, (tmp_path / "demo.log").read_text(errors="replace")[-3000:]
        assert len(seen) >= 5, seen
        time.sleep(3)  # the swarm's bootstrap peer starting too
        seen.update({child.pid: child for child in parent.children(recursive=True)})
        os.kill(demo.pid, signal.SIGTERM)  # the demo's process alone, as a service manager sends it
        demo.wait(120)
        _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
        alive += [p for p in _started_for(tmp_path) if p.pid not in seen]  # any started after the last look, too
        assert not alive, [(p.pid, " ".join(p.cmdline())[:200]) for p in alive]
    finally:
        for child in [*seen.values(), *_started_for(tmp_path)]:
            try:
                if child.is_running():
                    child.kill()
            except psutil.NoSuchProcess:
                pass
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        log.close()
