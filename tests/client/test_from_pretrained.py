"""``from_pretrained`` against real DHT processes: the peer list it reads from the environment, and what a failed call
leaves behind (nothing: every try used to leak a hivemind DHT process)."""

from __future__ import annotations

import shutil

import psutil
import pytest

from nectar.client import DistributedModelForCausalLM
from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmXYeFtVr5oXfPb5mJp5PfHbZfNmnxLJ8Su8SmNT7hjQrs"  # nothing listens on port 9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", seed=0))


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        yield swarm


def _children() -> dict[int, str]:
    """This process's descendants that are still around (zombies included), but torch's shared-memory manager."""
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            name, status = child.name(), child.status()
        except psutil.NoSuchProcess:
            continue
        if name != "torch_shm_manager":
            found[child.pid] = f"{name} ({status})"
    return found


def test_peers_from_the_environment_may_be_separated_by_commas(tiny, bootstrap, monkeypatch):
    address = bootstrap.initial_peers[0]
    monkeypatch.setenv("NECTAR_INITIAL_PEERS", f"{address},{address}")  # the CLI's rule; spaces only used to work
    model = DistributedModelForCausalLM.from_pretrained(tiny)
    try:
        assert tuple(model.client_config.initial_peers) == (address, address)
        assert model.runtime.p2p is not None
    finally:
        model.shutdown()


def test_a_failed_from_pretrained_leaves_no_process_behind(tiny, bootstrap, tmp_path):
    weightless = tmp_path / "weightless"  # config and all, but no weights: the client head cannot load
    shutil.copytree(tiny, weightless)
    (weightless / "model.safetensors").unlink()
    before = _children()
    for attempt in range(3):
        with pytest.raises(Exception):  # noqa: B017  (the swarm is not up: whatever hivemind raises)
            DistributedModelForCausalLM.from_pretrained(tiny, initial_peers=[UNREACHABLE])
        with pytest.raises(Exception):  # noqa: B017  (the DHT joined, then the model failed to load)
            DistributedModelForCausalLM.from_pretrained(str(weightless), initial_peers=bootstrap.initial_peers)
        left = {pid: what for pid, what in _children().items() if pid not in before}
        assert left == {}, f"attempt {attempt}: from_pretrained left {left} behind"
