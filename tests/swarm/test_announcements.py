"""Announcements: forged records are refused and ignored; nodes pick the least-served blocks and re-balance."""

from __future__ import annotations

import os
import time

import hivemind
import pytest
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from nectar.node.identity import load_or_create_p2p_identity
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.announce import AnnouncementValidator, ServerInfo, ServerState, block_key
from nectar.wire.dht import ClientRuntime
from nectar.wire.swarm import read_swarm

pytestmark = pytest.mark.slow


def _view(swarm, model_id="tiny-llama", num_blocks=4):
    runtime = ClientRuntime(swarm.initial_peers)
    try:
        return read_swarm(runtime, model_id, num_blocks).blocks
    finally:
        runtime.shutdown()


def _forged_info(**overrides) -> dict:
    info = ServerInfo(
        state=int(ServerState.ONLINE),
        start=0,
        end=4,
        throughput=1e9,
        inference_rps=1e9,
        forward_rps=1e9,
        network_rps=1e9,
        dtype="float32",
        cache_tokens_left=10**9,
        price_per_token=0,
        eth_address="0x" + "66" * 20,
        public_name="evil",
    )
    return {**info.to_dict(), **overrides}


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.add_node(
            tiny_llama, blocks=(0, 2), name="a", extra_args=["--throughput", "100", "--announce-period", "2"]
        )
        swarm.wait_for_blocks(tiny_llama, 2)
        yield swarm


def test_node_chooses_least_served_blocks_and_rebalances(swarm, tiny_llama):
    # blocks 0:2 are served by "a": an automatic node with 2 blocks must take 2:4
    auto = swarm.add_node(
        tiny_llama,
        name="auto",
        extra_args=["--num-blocks", "2", "--throughput", "100", "--announce-period", "2", "--rebalance-period", "3"],
    )
    assert any("blocks 2:4" in line for line in auto.lines), auto.lines
    # a second automatic node now sees every block equally served and takes the first window
    second = swarm.add_node(
        tiny_llama,
        name="auto2",
        extra_args=["--num-blocks", "2", "--throughput", "100", "--announce-period", "2", "--rebalance-period", "3"],
    )
    assert any("blocks 0:2" in line for line in second.lines), second.lines
    # when "auto" dies, blocks 2:4 are unserved: "auto2" (a redundant copy of 0:2) moves there by itself
    swarm.kill(auto)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = _view(swarm)
        names = {info.public_name for info in view[2].values() if info.state == ServerState.ONLINE}
        if "auto2" in names:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"auto2 did not move to blocks 2:4; its log:\n{second.log()[-2000:]}")
    assert "Re-balancing" in second.log()


def test_forged_announcements_are_refused_and_ignored(swarm, tmp_path):
    victim = PeerID.from_base58(swarm.nodes[0].address.rsplit("/", 1)[-1])
    key = load_or_create_p2p_identity(tmp_path / "rogue.key")
    # A rogue peer running Nectar's validator with its own key: it cannot sign for the victim.
    rogue = hivemind.DHT(
        initial_peers=swarm.initial_peers,
        start=True,
        identity_path=str(tmp_path / "rogue.key"),
        check_if_identity_free=False,
        record_validators=[AnnouncementValidator(key)],
    )
    # A rogue peer without any validator: it can send whatever bytes it likes.
    raw = hivemind.DHT(initial_peers=swarm.initial_peers, start=True)
    try:
        expires = get_dht_time() + 60
        for dht in (rogue, raw):
            # (a rogue may keep the forgery in its own storage; honest peers refuse it and readers drop it)
            dht.store(block_key("tiny-llama", 0), _forged_info(), expires + 30, subkey=victim.to_bytes())
            # an unsigned record under the rogue's own subkey is refused too
            dht.store(block_key("tiny-llama", 1), _forged_info(), expires, subkey=b"not-a-peer-id")
        # the rogue may announce itself (signed by its own key): that is legitimate and visible
        assert rogue.store(
            block_key("tiny-llama", 3), _forged_info(start=3, end=4), expires, subkey=rogue.peer_id.to_bytes()
        )
        time.sleep(1)
        view = _view(swarm)
        assert view[0][victim].end == 2 and view[0][victim].public_name == "a"  # the real record survived
        assert all(info.public_name != "evil" for peer, info in view[0].items())
        assert all(info.public_name != "evil" for peer, info in view[1].items())
        assert view[3][rogue.peer_id].public_name == "evil"  # signed by its own key: accepted for itself only
    finally:
        rogue.shutdown()
        raw.shutdown()


def test_a_node_whose_dht_process_died_still_stops_on_sigterm(swarm, tiny_llama):
    import os
    import signal

    import psutil

    node = swarm.add_node(tiny_llama, blocks=(0, 2), name="orphaned", extra_args=["--throughput", "100"])
    main = psutil.Process(node.process.pid)
    (dht_process,) = [p for p in main.children() if p.cmdline() == main.cmdline()]  # hivemind forks the DHT
    dht_process.kill()
    os.kill(node.process.pid, signal.SIGTERM)
    # its OFFLINE announcement gives up after a few seconds instead of waiting for the dead DHT forever
    assert node.process.wait(timeout=30) is not None


@pytest.mark.parametrize("in_process", [False, True], ids=["dht-process", "in-process"])
def test_a_shut_down_client_runtime_gives_back_its_file_descriptors(swarm, in_process):
    """The ledger's swarm view, every client model and ``LocalSwarm`` open a runtime; each one shut down must not keep
    its event loop's descriptors (epoll, wake-up pipes: six per runtime before the loop was closed)."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def one_runtime() -> None:
        runtime = ClientRuntime(swarm.initial_peers, in_process=in_process)
        assert runtime.get_many(["nectar-no-such-key"], timeout=30) == {"nectar-no-such-key": None}
        runtime.shutdown()
        runtime.shutdown()  # idempotent

    one_runtime()  # imports and hivemind's once-per-process pipes
    before = open_fds()
    for _ in range(3):
        one_runtime()
    assert open_fds() - before <= 0, f"{open_fds() - before} descriptors left open by 3 runtimes"
