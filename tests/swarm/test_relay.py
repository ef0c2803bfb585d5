"""A node behind NAT serves through a circuit relay (issue 23): greedy output identical to transformers.

NAT is simulated without privileges, so it runs on any machine: the relayed node listens on no port at all
(``--reachability relay``), so no peer can dial it, exactly what a NAT does to inbound connections; it dials out to
the swarm and libp2p's auto-relay reserves a slot at a peer. Relays must announce a public or DNS address (libp2p
builds no circuit through a private one), so the swarm's peers announce ``/dns4/localhost/...``, and there are four of
them (auto-relay picks a relay once it has seen a few candidates).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.multiaddr import Multiaddr
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.node.local_swarm import LocalSwarm
from nectar.node.server import check_reachability, create_dht, visible_addresses
from nectar.wire.reachability import RPC_REACHABILITY, ReachabilityService, ask_peers
from nectar.wire.swarm import connected_hosts, is_relayed
from nectar.wire.transport import serve_stream

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Peers:
    """Bare P2P daemons on a loop thread: the swarm's other peers (every peer relays for others by default)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.peers: list[P2P] = []

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, initial_peers: list[str]) -> P2P:
        port = _free_port()
        peer = self.run(
            P2P.create(
                initial_peers=initial_peers,
                host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"],
                announce_maddrs=[f"/ip4/127.0.0.1/tcp/{port}", f"/dns4/localhost/tcp/{port}"],
            )
        )
        self.peers.append(peer)
        return peer

    def close(self):
        for peer in self.peers:
            self.run(peer.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def peers():
    peers = Peers()
    yield peers
    peers.close()


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory, peers):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm"), direct=True) as swarm:
        swarm.start_bootstrap(["--port", str(_free_port()), "--announce-host", "localhost"])
        for _ in range(3):
            peers.add(swarm.initial_peers)
        swarm.add_node(tiny_llama, blocks=(0, 2), name="direct", extra_args=["--throughput", "100"])
        swarm.add_node(
            tiny_llama, blocks=(2, 4), name="natted", extra_args=["--throughput", "100", "--reachability", "relay"]
        )
        swarm.wait_for_blocks(tiny_llama, 4)
        yield swarm


@pytest.fixture(scope="module")
def model(swarm, tiny_llama):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(step_timeout=20, connect_timeout=10)
    )
    yield model
    model.shutdown()


def _records(model) -> dict:
    servers = model.sequence_manager.servers()
    return {info.public_name: (peer, info) for block in servers.values() for peer, info in block.items()}


def test_nodes_say_how_peers_reach_them(swarm, model):
    direct, natted = swarm.nodes
    assert "Reachable directly at 127.0.0.1:" in direct.log()  # the bootstrap peer dialled it back
    assert "Serving through relays at" in natted.log()
    assert all(is_relayed(line) for line in natted.lines if line.startswith("/"))  # its join addresses: circuits
    records = _records(model)
    assert records["direct"][1].relayed is False and records["direct"][1].direct_address
    assert records["natted"][1].relayed is True
    assert records["natted"][1].direct_address == ""  # nobody could dial a lane


def test_nectar_swarm_joins_by_swarm_file_and_marks_the_relayed_node(swarm, tiny_llama, tmp_path):
    path = tmp_path / "local.toml"
    path.write_text(f'name = "local"\ninitial_peers = {json.dumps(swarm.initial_peers)}\nmodel = "{tiny_llama}"\n')
    env = {k: v for k, v in swarm.env.items() if k not in ("NECTAR_INITIAL_PEERS", "NECTAR_SWARM")}
    shown = subprocess.run(
        [sys.executable, "-m", "nectar.cli", "swarm", "--swarm", str(path)],  # peers and model from the file
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()[2:] if line.strip()}
    assert rows["natted"].endswith("(relayed)") and not rows["direct"].endswith("(relayed)")


def test_generation_through_the_relayed_node_equals_transformers(swarm, model, tiny_llama):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    input_ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    ours = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    theirs = reference.generate(input_ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert ours.tolist() == theirs[:, : ours.shape[1]].tolist()
    natted = _records(model)["natted"][0]
    route = model.sequence_manager.make_inference_route()
    assert [span.peer_id for span in route][-1] == natted
    # the client reaches it only through a relay: a circuit address, so no host a direct lane could be on
    runtime = model.sequence_manager.runtime
    peers = {info.peer_id: info.addrs for info in runtime.run(runtime.p2p.list_peers())}
    assert peers[natted] and all(is_relayed(addr) for addr in peers[natted])
    assert runtime.run(connected_hosts(runtime.p2p))[natted] == set()


async def _ask(asker: P2P, helper: P2P, addrs: list[str]):
    """``ask_peers`` with ``helper`` as the only peer asked (connected first, as a node is to its swarm)."""
    helper_addrs = [Multiaddr(str(a).split("/p2p/")[0]) for a in await helper.get_visible_maddrs()]
    await asker._client.connect(helper.peer_id, helper_addrs)
    others = [info.peer_id for info in await asker.list_peers() if info.peer_id != helper.peer_id]
    return await ask_peers(asker, addrs, max_peers=1, exclude=others)


def _tcp(p2p: P2P, peers: Peers) -> list[str]:
    return [str(a) for a in peers.run(p2p.get_visible_maddrs()) if str(a).startswith("/ip4/")]


@pytest.fixture(scope="module")
def helper(swarm, peers):
    """A reachability helper on one of the swarm's bare peers."""
    helper = ReachabilityService(peers.peers[0])
    peers.run(helper.add_handler())
    return helper


def test_reachability_check_dials_only_the_askers_own_host(peers, helper):
    helper_p2p, asker, other = peers.peers[:3]
    own = _tcp(asker, peers)
    closed = _free_port()
    claims = [
        f"/ip4/127.0.0.1/tcp/{closed}",  # the asker's host, nothing listening: dialled, fails
        "/ip4/10.255.255.1/tcp/31337",  # another host: never dialled
        own[0].replace(str(asker.peer_id), str(helper_p2p.peer_id)),  # another peer's id: never dialled
        f"/dns4/localhost/tcp/{closed}",  # a name: never resolved
    ]
    found = peers.run(_ask(asker, helper_p2p, claims))
    assert found.answered == 1 and found.reachable is False
    assert helper.dialled == [("127.0.0.1", closed)]
    # the same asker again within the interval is refused (unknown), then another asker's true address is reached
    again = peers.run(_ask(asker, helper_p2p, own))
    assert again.reachable is None and again.answered == 0
    mine = _tcp(other, peers)
    found = peers.run(_ask(other, helper_p2p, mine))
    host, port = mine[0].split("/")[2], mine[0].split("/")[4]
    assert found.reachable is True and found.at == [f"{host}:{port}"]


def test_a_node_whose_address_peers_cannot_dial_finds_out_and_says_what_to_do(swarm, peers, caplog):
    """NAT as peers see it: the node's connections come from one host (here 127.0.0.1), the address it listens on
    and announces is another, private one (10.255.255.1) that nobody outside can dial."""
    port = _free_port()
    dht = create_dht(
        host="127.0.0.1",
        port=port,
        initial_peers=swarm.initial_peers,
        identity_path=None,
        private_key=None,
        announce_host="10.255.255.1",
    )
    p2p = peers.run(dht.replicate_p2p())
    try:
        addresses = visible_addresses(dht)
        assert addresses == [f"/ip4/10.255.255.1/tcp/{port}/p2p/{dht.peer_id}"]
        with caplog.at_level(logging.INFO, logger="nectar.node.server"):
            found = peers.run(check_reachability(p2p, addresses, port, swarm.initial_peers))
        assert found is False  # the bootstrap peer answered first (it is asked first), and never dialled 10.x
        assert "Not reachable from outside (NAT/firewall?)" in caplog.text
        assert f"open TCP port {port}" in caplog.text and "--announce-host" in caplog.text
        assert "they see it at 127.0.0.1" in caplog.text
    finally:
        peers.run(p2p.shutdown())
        dht.shutdown()


def test_the_initial_peers_answer_outweighs_a_liars(swarm, peers, helper):
    liar = peers.peers[1]

    async def lie(requests, context):
        async for _ in requests:
            yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps({"reachable": True, "at": ["6.6.6.6:1"]}))
            return

    peers.run(serve_stream(liar, RPC_REACHABILITY, lie))
    asker = peers.add(swarm.initial_peers)

    async def ask(prefer, askable):
        for peer in askable:
            addrs = [Multiaddr(str(a).split("/p2p/")[0]) for a in await peer.get_visible_maddrs()]
            await asker._client.connect(peer.peer_id, addrs)
        ids = {peer.peer_id for peer in askable}
        others = [info.peer_id for info in await asker.list_peers() if info.peer_id not in ids]
        return await ask_peers(asker, ["/ip4/10.255.255.1/tcp/1"], prefer=prefer, exclude=others)

    found = peers.run(ask([helper.p2p.peer_id], [helper.p2p, liar]))
    assert found.answered == 2 and found.reachable is False and found.at == []  # the initial peer's word counts
    found = peers.run(ask([], [liar]))  # with no initial peer answering, a yes is all there is to go on
    assert found.reachable is True and found.at == ["6.6.6.6:1"]
