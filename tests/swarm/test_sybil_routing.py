"""Sybil records (issue 22): one process mints peer ids and stores validly signed announcements that claim the whole
model at throughput 1e9 and price 0, with a direct lane that accepts and never answers. Routing must measure
before it trusts them, readers must cap how long a record lives and refuse borrowed Ethereum addresses, and an
honest node must push only to a route node's lane, never to a host a record names.

One real swarm: a bootstrap peer and one honest node serving all 4 blocks of the tiny model (direct lane on).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

import hivemind
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from transformers import AutoConfig, AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.client.hop_stream import HopStream
from nectar.client.routing import RemoteSequenceManager, ReputationScorer
from nectar.client.routing.spans import RemoteSpan
from nectar.node.identity import load_or_create_p2p_identity
from nectar.node.local_swarm import LocalSwarm
from nectar.wire import eip712
from nectar.wire.announce import AnnouncementValidator, ServerInfo, ServerState, block_key
from nectar.wire.dht import ClientRuntime
from nectar.wire.identity import peer_id_of
from nectar.wire.ledger_api import NodeStake, StakeTable
from nectar.wire.swarm import read_swarm

try:
    from nectar.wire.announce import MAX_RECORD_AGE, sign_eth_proof
except ImportError:  # the code before issue 22, where these tests are run to show that they fail there
    MAX_RECORD_AGE, sign_eth_proof = 60.0, None

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

MODEL, BLOCKS = "tiny-llama", 4
PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3]])
SYBIL_BOUND = 120.0  # s: a generous bound on an honest 4-token generation facing 3 sybils (measured: see the log)
MIN = 100 * 10**18
CLIENT = "0x" + "c1" * 20


class SybilValidator(AnnouncementValidator):
    """Signs records for any of its minted peer keys (what one attacker process with many identities does), and
    keeps records of any expiry (an attacker runs what code it likes)."""

    max_expiry = float("inf")

    def __init__(self, keys=()):
        super().__init__(None)
        self._keys = {MSGPackSerializer.dumps(peer_id_of(k).to_bytes()): k for k in keys}

    def __getstate__(self):
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        return {"raw": [k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()) for k in self._keys.values()]}

    def __setstate__(self, state):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.__init__([Ed25519PrivateKey.from_private_bytes(raw) for raw in state["raw"]])

    def sign_value(self, record):
        key = self._keys.get(record.subkey)
        if key is None:
            return record.value
        return record.value + self.SIGNATURE_MARKER + key.sign(self._signed_bytes(record, record.value))


class BlackHole:
    """A TCP lane that accepts every connection and never answers; counts them."""

    def __init__(self, host="127.0.0.1"):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self):
        self.sock.close()
        for connection in self.accepted:
            connection.close()


def _record(peer: PeerID, eth_key: str | None, *, lane: str, start=0, end=BLOCKS, **overrides) -> dict:
    address = eip712.address_of(eth_key) if eth_key else "0x" + "66" * 20
    info = ServerInfo(
        state=int(ServerState.ONLINE),
        start=start,
        end=end,
        throughput=1e9,
        inference_rps=1e9,
        forward_rps=1e9,
        network_rps=1e9,
        dtype="float32",
        cache_tokens_left=10**9,
        price_per_token=0,
        eth_address=address,
        public_name="sybil",
        direct_address=lane,
    ).to_dict()
    if sign_eth_proof is not None and eth_key:
        info["eth_proof"] = sign_eth_proof(eth_key, peer)  # a sybil can prove its own fresh address
    return {**info, **overrides}


def _store(dht, peer: PeerID, value: dict, *, start=0, end=BLOCKS, expires: float | None = None) -> None:
    expires = get_dht_time() + (expires if expires is not None else 30)
    for block in range(start, end):
        assert dht.store(block_key(MODEL, block), value, expires, subkey=peer.to_bytes()), "the sybil store failed"


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm"), direct=True) as swarm:
        swarm.add_node(tiny_llama, blocks=(0, BLOCKS), name="honest", extra_args=["--throughput", "100"])
        swarm.wait_for_blocks(tiny_llama, BLOCKS)
        yield swarm


@pytest.fixture(scope="module")
def honest(swarm):
    node = swarm.nodes[0]
    return PeerID.from_base58(node.address.rsplit("/", 1)[-1]), node.eth_address


@pytest.fixture(scope="module")
def sybils(swarm, tmp_path_factory):
    """One process (its own DHT peer) holding 3 minted identities, each with its own Ethereum key; their records are
    re-stored every 5 s while the attacker lives."""
    keys = [load_or_create_p2p_identity(tmp_path_factory.mktemp("sybil") / f"{i}.key") for i in range(3)]
    peers = [peer_id_of(key) for key in keys]
    eth_keys = ["0x" + secrets.token_hex(32) for _ in keys]
    hole = BlackHole()
    dht = hivemind.DHT(initial_peers=swarm.initial_peers, start=True, record_validators=[SybilValidator(keys)])
    stop = threading.Event()

    def announce():
        while not stop.is_set():
            for peer, eth_key in zip(peers, eth_keys):
                try:
                    _store(dht, peer, _record(peer, eth_key, lane=hole.address))
                except Exception:
                    logger.warning("A sybil store failed", exc_info=True)
            stop.wait(5)

    thread = threading.Thread(target=announce, daemon=True)
    thread.start()
    yield dht, peers, hole
    stop.set()
    thread.join(timeout=30)
    dht.shutdown()
    hole.close()


@pytest.fixture(scope="module")
def expected(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval().generate(PROMPT, max_new_tokens=4, do_sample=False)


def _view(swarm, **kwargs):
    runtime = ClientRuntime(swarm.initial_peers)
    try:
        return read_swarm(runtime, MODEL, BLOCKS, **kwargs).blocks
    finally:
        runtime.shutdown()


def test_dht_peers_refuse_to_keep_a_record_past_the_cap(swarm, tmp_path):
    """A record stored with a day-long expiry must not outlive its signer on the honest DHT peers: they refuse to
    store it (first in this module: no attacker peer of the other tests is up to keep it; a record with an ordinary
    expiry, from the same attacker, is kept and read after the attacker left)."""
    keys = [load_or_create_p2p_identity(tmp_path / f"{name}.key") for name in ("day", "minute")]
    day, minute = (peer_id_of(key) for key in keys)
    dht = hivemind.DHT(initial_peers=swarm.initial_peers, start=True, record_validators=[SybilValidator(keys)])
    try:
        for peer, expires in ((day, 86400), (minute, 60)):
            dht.store(
                block_key(MODEL, 1), _record(peer, None, lane=""), get_dht_time() + expires, subkey=peer.to_bytes()
            )
    finally:
        dht.shutdown()  # the attacker leaves: what it stored lives on only where honest peers kept it
    reader = hivemind.DHT(
        initial_peers=swarm.initial_peers, client_mode=True, start=True, record_validators=[SybilValidator()]
    )
    try:
        raw = reader.get(block_key(MODEL, 1), latest=True)  # read without the expiry cap: what peers hold
        held = set(raw.value) if raw is not None else set()
        assert minute.to_bytes() in held  # honest peers keep an ordinary record after its signer left...
        assert day.to_bytes() not in held  # ...but refused the one claiming to live a day
    finally:
        reader.shutdown()


def test_an_honest_client_generates_past_three_sybil_black_holes(swarm, sybils, tiny_llama, expected):
    _, peers, hole = sybils
    deadline = time.monotonic() + 30
    while not all(peer in _view(swarm)[0] for peer in peers):  # the client below sees the sybils from its start
        assert time.monotonic() < deadline, "the sybil records never became visible"
        time.sleep(1)
    began = time.monotonic()
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(step_timeout=10)
    )
    try:
        tokens = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    finally:
        model.shutdown()
    elapsed = time.monotonic() - began
    logger.warning(
        f"Honest generation (client start + 4 tokens) facing 3 sybils: {elapsed:.1f}s; "
        f"{len(hole.accepted)} connections to the sybils' lane"
    )
    assert tokens.tolist() == expected.tolist()
    assert elapsed < SYBIL_BOUND


def test_a_sybil_borrowing_a_reputable_address_gets_no_stake_weight(swarm, sybils, honest):
    _, _, hole = sybils
    honest_peer, honest_address = honest
    key = load_or_create_p2p_identity(swarm.workdir / "thief.key")
    peer = peer_id_of(key)
    thief = hivemind.DHT(initial_peers=swarm.initial_peers, start=True, record_validators=[SybilValidator([key])])
    try:
        honest_info = _view(swarm)[0][honest_peer]
        # the honest node's address, with the honest node's own proof copied (it is over the honest peer id)
        stolen = _record(peer, None, lane=hole.address, eth_address=honest_address)
        stolen["eth_proof"] = honest_info.to_dict().get("eth_proof", "")
        _store(thief, peer, stolen)
        view = _view(swarm)[0]
        assert view[peer].public_name == "sybil"  # its record is readable (signed by its own peer key)...
        assert view[honest_peer].eth_address.lower() == honest_address.lower()
        assert view[peer].eth_address.lower() != honest_address.lower()  # ...but the address it borrowed is gone

        scorer = ReputationScorer("http://127.0.0.1:9", exploration=0.0, refresh_period=3600, require_stake=True)
        try:
            registered = NodeStake(honest_address.lower(), True, str(honest_peer), 16 * MIN, 0, 0, MIN)
            scorer._stakes = StakeTable(MIN, {honest_address.lower(): registered})  # as /v1/stakes would say
            assert scorer.cost_factor(honest_peer, view[honest_peer]) == pytest.approx(0.5)
            assert scorer.cost_factor(peer, view[peer]) == 1.0  # no stake weight borrowed
            assert not scorer.eligible(peer, view[peer])
        finally:
            scorer.close()
    finally:
        thief.shutdown()


def test_a_record_claiming_to_live_a_day_is_dropped_after_the_reader_cap(swarm, sybils, tmp_path):
    key = load_or_create_p2p_identity(tmp_path / "old.key")
    peer = peer_id_of(key)
    dht = hivemind.DHT(initial_peers=swarm.initial_peers, start=True, record_validators=[SybilValidator([key])])
    try:
        # made (nearly) as long ago as readers allow, never refreshed
        value = _record(peer, "0x" + secrets.token_hex(32), lane="", timestamp=time.time() - MAX_RECORD_AGE + 6)
        _store(dht, peer, value, start=0, end=1, expires=60)
        assert peer in _view(swarm, blocks=[0])[0]
        time.sleep(8)
        raw = dht.get(block_key(MODEL, 0), latest=True)
        assert raw is not None and peer.to_bytes() in raw.value  # the DHT still holds it...
        assert peer not in _view(swarm, blocks=[0])[0]  # ...but readers no longer use it
    finally:
        dht.shutdown()


async def _close(hop):
    hop.close()


def test_a_node_never_pushes_to_a_host_a_record_names(swarm, sybils, honest, tiny_llama, tmp_path):
    """A sybil peer (a real, connected P2P peer) announces block 2 with a lane on another host (127.0.0.2): a client
    asking the honest node to push there is refused, and nothing connects to that host."""
    honest_peer, _ = honest
    tiny_config = AutoConfig.from_pretrained(tiny_llama)
    key = load_or_create_p2p_identity(tmp_path / "lane.key")
    victim = BlackHole("127.0.0.2")
    dht = hivemind.DHT(
        initial_peers=swarm.initial_peers,
        start=True,
        identity_path=str(tmp_path / "lane.key"),
        check_if_identity_free=False,
        record_validators=[AnnouncementValidator(key)],
    )
    runtime = ClientRuntime(swarm.initial_peers)
    try:
        info = read_swarm(runtime, MODEL, BLOCKS, blocks=[0]).blocks[0][honest_peer]
        _store(dht, dht.peer_id, _record(dht.peer_id, "0x" + secrets.token_hex(32), lane=victim.address), start=2)
        assert dht.peer_id in _view(swarm, blocks=[2])[2]
        hop = HopStream(runtime, RemoteSpan(honest_peer, 0, 2, info), MODEL)  # a hop whose next block is 2

        async def push_step():
            key = "0x" + secrets.token_hex(32)  # nodes serve only opens signed by the paying client's key
            await hop.open(
                session_id=os.urandom(16),
                max_length=16,
                batch_size=1,
                client=eip712.address_of(key),
                push_token=None,
                timeout=10,
                private_key=key,
            )
            hidden = torch.zeros(1, 1, int(tiny_config.hidden_size))
            return await hop.step([hidden], step=0, position=0, push_to=(victim.address, os.urandom(16)), timeout=10)

        reply = runtime.run(push_step(), 30)
        assert reply.outputs  # the step was served (relayed by the client), not the push
        time.sleep(1)
        runtime.run(_close(hop), 10)
        assert victim.accepted == []  # the honest node never connected to the named host
    finally:
        runtime.shutdown()
        dht.shutdown()
        victim.close()


def test_a_client_never_dials_a_lane_on_another_host_than_the_records_peer(swarm, sybils, honest, tmp_path):
    """A real, connected sybil peer announces the whole model with a direct lane on another host (127.0.0.2): the
    client pings and routes it over P2P only, never connects to that host, and still uses the honest node's lane."""
    honest_peer, _ = honest
    key = load_or_create_p2p_identity(tmp_path / "aim.key")
    victim = BlackHole("127.0.0.2")
    dht = hivemind.DHT(
        initial_peers=swarm.initial_peers,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        identity_path=str(tmp_path / "aim.key"),
        check_if_identity_free=False,
        record_validators=[AnnouncementValidator(key)],
    )
    runtime = ClientRuntime(swarm.initial_peers)
    try:
        _store(dht, dht.peer_id, _record(dht.peer_id, "0x" + secrets.token_hex(32), lane=victim.address))
        manager = RemoteSequenceManager(runtime, MODEL, BLOCKS, config=ClientConfig())
        deadline = time.monotonic() + 30
        while dht.peer_id not in manager.servers().get(0, {}):
            assert time.monotonic() < deadline, "the record never became visible"
            manager.update(force=True)
        routes = {}
        for _ in range(3):
            for span in manager.make_inference_route():
                routes[span.peer_id] = span.info.direct_address
            manager.update(force=True)
        time.sleep(1)
        assert victim.accepted == []  # no ping, no step: the record could not aim the client at 127.0.0.2
        if dht.peer_id in routes:
            assert routes[dht.peer_id] == ""  # routed over P2P only
        assert manager._lanes.get(honest_peer) == manager.servers()[0][honest_peer].direct_address  # honest lane kept
    finally:
        runtime.shutdown()
        dht.shutdown()
        victim.close()
