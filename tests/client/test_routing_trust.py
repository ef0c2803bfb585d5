"""Routing trusts measurements, not records (issue 22), on a fixed swarm view: bans, latency and throughput of
peers the client has not measured, unproven addresses, and the eth proof itself."""

from __future__ import annotations

import dataclasses
import secrets
import time

from nectar.client.config import ClientConfig
from nectar.client.routing.sequence_manager import UNMEASURED_LATENCY
from nectar.wire import eip712
from nectar.wire.announce import ServerInfo, eth_proof_valid, record_fresh, sign_eth_proof
from tests.client.test_routing import _info, _manager, _peer


def test_a_ban_outlasts_the_connect_timeout_and_grows_per_peer():
    manager = _manager({_peer(1): _info(0, 8)})
    manager.config = ClientConfig(connect_timeout=10.0, min_backoff=0.5, max_backoff=60.0)
    lengths = []
    for _ in range(5):
        manager.ban(_peer(1), "timed out")
        lengths.append(manager._banned_until[_peer(1)] - time.monotonic())
    assert lengths[0] >= 9.9  # not 0.5 s: the retry that follows must not find the peer free again
    assert [round(x) for x in lengths] == [10, 20, 40, 60, 60]
    manager.ban(_peer(2), "step timed out", timeout=90.0)  # a longer timeout: at least that long
    assert manager._banned_until[_peer(2)] - time.monotonic() >= 89.9
    manager.mark_ok(_peer(1))  # it served a step well: the next ban starts over
    manager.ban(_peer(1), "again")
    assert round(manager._banned_until[_peer(1)] - time.monotonic()) == 10


def test_an_unmeasured_fast_claim_loses_to_a_measured_node():
    sybil, honest = _peer(1), _peer(2)
    manager = _manager({sybil: _info(0, 8, throughput=1e9), honest: _info(0, 8, throughput=100)})
    manager._latency = {honest: 0.01}  # the honest node answered our ping; the sybil was never measured
    assert manager.latency(sybil) >= UNMEASURED_LATENCY
    assert manager.make_inference_route()[0].peer_id == honest
    # a sybil that answers pings is still believed no faster than the slowest reachable node until observed
    manager._latency = {honest: 0.01, sybil: 0.009}
    assert manager.throughput(sybil, _info(0, 8, throughput=1e9), manager._unmeasured_cap(manager._servers[0])) == 100
    # a ping that failed counts as a connect timeout away
    manager._latency, manager._ping_failed = {honest: 0.01}, {sybil: time.monotonic()}
    assert manager.latency(sybil) == manager.config.connect_timeout
    assert manager.make_inference_route()[0].peer_id == honest


def test_observed_speed_caps_the_announced_one():
    peer = _peer(1)
    manager = _manager({peer: _info(0, 8, throughput=1e6)})
    manager.observe(peer, block_tokens=8, seconds=0.1)  # 80 block-tokens/s seen
    assert manager.throughput(peer, _info(0, 8, throughput=1e6)) == 80
    assert manager.throughput(peer, _info(0, 8, throughput=50)) == 50  # never above what it announces


def test_a_peer_without_a_proven_address_is_not_routed_to():
    unproven, proven = _peer(1), _peer(2)
    manager = _manager(
        {unproven: dataclasses.replace(_info(0, 8, 1e9), eth_address=""), proven: _info(0, 8, throughput=10)}
    )
    assert manager.make_inference_route()[0].peer_id == proven
    assert "not proven" in manager._unstaked[str(unproven)]


def test_eth_proof_binds_the_address_to_one_peer_id():
    key = "0x" + secrets.token_hex(32)
    address = eip712.address_of(key)
    proof = sign_eth_proof(key, _peer(1))
    assert eth_proof_valid(_peer(1), address, proof)
    assert not eth_proof_valid(_peer(2), address, proof)  # copied to another peer id
    assert not eth_proof_valid(_peer(1), "0x" + "22" * 20, proof)  # another address
    assert not eth_proof_valid(_peer(1), address, "0xnothex")


def test_records_age_out_on_the_readers_clock():
    info: ServerInfo = _info(0, 8)
    now = time.time()
    assert record_fresh(dataclasses.replace(info, timestamp=now - 10), now)
    assert not record_fresh(dataclasses.replace(info, timestamp=now - 3600), now)  # whatever its expiry says
    assert not record_fresh(dataclasses.replace(info, timestamp=now + 86400), now)  # dated ahead: a forgery
