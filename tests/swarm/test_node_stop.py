"""What a node leaves behind when it stops in its own process (stop 40):

- its announcements say OFFLINE at once. The final OFFLINE record used to expire sooner than the last ONLINE one, and
  the DHT keeps whichever of a peer's values expires last, so a stopped node stayed ONLINE for clients to route to
  until its record expired (30 s at the default announce period);
- none of its P2P handle's tasks is left pending. They were destroyed pending when the process exited, an asyncio
  ERROR line each ("Task was destroyed but it is pending!") on every GPU node's shutdown under Python 3.12.

One real node in this process (its DHT, P2P daemon and signing process are real) beside a real bootstrap peer."""

from __future__ import annotations

import time

import hivemind
import pytest

from nectar.node.config import NodeConfig
from nectar.node.server import Server
from nectar.wire.announce import AnnouncementValidator, ServerState
from nectar.wire.swarm import read_swarm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stopped(tiny_llama, tmp_path_factory):
    """(the node's announced state before and after it stopped, its P2P tasks that ran before, the stopped node)."""
    bootstrap = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[AnnouncementValidator()]
    )
    server = None
    try:
        server = Server(
            NodeConfig(
                model=tiny_llama,
                host="127.0.0.1",
                initial_peers=[str(address) for address in bootstrap.get_visible_maddrs()],
                key_dir=tmp_path_factory.mktemp("keys"),
                throughput=1.0,
                announce_period=2,
            )
        )
        server.start()

        peer = server.dht.peer_id

        def state(wanted: int) -> int | None:
            """The node's announced state, read until it is ``wanted`` (a store reaches the bootstrap in a moment)."""
            deadline = time.monotonic() + 10
            while True:
                swarm = read_swarm(bootstrap, server.model_id, server.num_model_blocks)
                found = swarm.servers().get(peer)
                found = None if found is None else found.state
                if found == wanted or time.monotonic() > deadline:
                    return found
                time.sleep(0.2)

        before = state(ServerState.ONLINE)
        p2p = server.p2p
        # hivemind 1.1.12's handle: the listener and the persistent connection's reader and writer
        tasks = [p2p._listen_task, p2p._client.control._read_task, p2p._client.control._write_task]
        running = [task for task in tasks if task is not None and not task.done()]
        server.stop()
        server._loop_thread.join(10)
        yield before, state(ServerState.OFFLINE), running, server
    finally:
        if server is not None:
            server.stop()
        bootstrap.shutdown()


def test_a_stopped_node_is_announced_offline_at_once(stopped):
    before, after, _, _ = stopped
    assert before == ServerState.ONLINE
    assert after == ServerState.OFFLINE, f"announced as {after!r} after the node stopped, not OFFLINE (0)"


def test_a_stopped_node_leaves_no_p2p_task_pending(stopped):
    _, _, running, server = stopped
    assert running, "a serving node's P2P handle runs a listener and a connection"
    assert not server._loop_thread.is_alive()
    pending = [task for task in running if not task.done()]
    assert not pending, f"left pending after stop: {pending}"
