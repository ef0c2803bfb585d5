"""Route finding on a given swarm view: shortest paths, cache and ban awareness, scorer hook, training routes."""

from __future__ import annotations

import collections
import time

import pytest
from hivemind.p2p import PeerID

from nectar.client.config import ClientConfig
from nectar.client.routing import MissingBlocksError, PeerScorer, RemoteSequenceManager
from nectar.wire.announce import ServerInfo, ServerState


def _info(start, end, throughput=100.0, cache=10**6, name="", state=ServerState.ONLINE, price=0):
    return ServerInfo(
        state=int(state),
        start=start,
        end=end,
        throughput=throughput,
        inference_rps=throughput,
        forward_rps=throughput,
        network_rps=1e9,
        dtype="float32",
        cache_tokens_left=cache,
        price_per_token=price,
        eth_address="0x" + "11" * 20,
        public_name=name,
    )


def _peer(i: int) -> PeerID:
    return PeerID(b"\x00\x24\x08\x01\x12\x20" + bytes([i]) * 32)


def _manager(servers: dict[PeerID, ServerInfo], num_blocks=8, scorer=None) -> RemoteSequenceManager:
    manager = RemoteSequenceManager(None, "m", num_blocks, config=ClientConfig(), scorer=scorer)
    view = {b: {p: i for p, i in servers.items() if i.start <= b < i.end} for b in range(num_blocks)}
    manager._servers, manager._updated = view, time.monotonic() + 3600  # a fixed view, no DHT lookups
    return manager


def test_shortest_path_prefers_fewer_faster_hops():
    fast_all, slow_left, slow_right = _peer(1), _peer(2), _peer(3)
    manager = _manager({fast_all: _info(0, 8, 1000), slow_left: _info(0, 4, 10), slow_right: _info(4, 8, 10)})
    route = manager.make_inference_route()
    assert [(s.peer_id, s.start, s.end) for s in route] == [(fast_all, 0, 8)]
    # sub-spans of a bigger server are usable
    assert [(s.start, s.end) for s in manager.make_inference_route(2, 5)] == [(2, 5)]


def test_latency_cache_and_bans_steer_routes():
    near, far = _peer(1), _peer(2)
    manager = _manager({near: _info(0, 8, 100), far: _info(0, 8, 100)})
    manager._latency = {near: 0.001, far: 0.5}
    assert manager.make_inference_route()[0].peer_id == near
    manager._latency = {near: 0.5, far: 0.001}
    assert manager.make_inference_route()[0].peer_id == far
    # not enough free cache for the session: the other peer is used
    manager = _manager({near: _info(0, 8, 100, cache=10), far: _info(0, 8, 50, cache=10**6)})
    assert manager.make_inference_route(cache_tokens=100)[0].peer_id == far
    manager.ban(far, "test")
    assert manager.make_inference_route(cache_tokens=100)[0].peer_id == near  # better a full cache than nothing


def test_scorer_hook_can_avoid_a_peer():
    cheap, pricey = _peer(1), _peer(2)

    class PriceScorer(PeerScorer):
        def cost_factor(self, peer_id, info):
            return 1 + info.price_per_token

    manager = _manager({cheap: _info(0, 8, 100, price=0), pricey: _info(0, 8, 150, price=5)}, scorer=PriceScorer())
    assert manager.make_inference_route()[0].peer_id == cheap


def test_missing_blocks_error_says_what_to_do():
    manager = _manager({_peer(1): _info(0, 3), _peer(2): _info(5, 8)})
    with pytest.raises(MissingBlocksError) as error:
        manager.runtime = None
        manager.update = lambda force=False: None
        manager.make_inference_route()
    assert error.value.blocks == [3, 4] and "nectar node" in str(error.value) and "--blocks 3:5" in str(error.value)


def test_offline_and_joining_nodes_are_not_routed():
    online, offline = _peer(1), _peer(2)
    manager = _manager({online: _info(0, 8, 10), offline: _info(0, 8, 1000, state=ServerState.OFFLINE)})
    assert manager.make_inference_route()[0].peer_id == online


def test_training_routes_spread_by_throughput():
    big, small = _peer(1), _peer(2)
    manager = _manager({big: _info(0, 8, 300), small: _info(0, 8, 100)})
    manager._observed = {big: 300.0, small: 100.0}  # speeds count once the client has seen them (issue 22)
    counts = collections.Counter(manager.make_training_route()[0].peer_id for _ in range(2000))
    assert 0.68 < counts[big] / 2000 < 0.82  # about 3:1
