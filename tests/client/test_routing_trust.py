"""Routing trusts measurements, not records (issue 22), on a fixed swarm view: bans, latency and throughput of
peers the client has not measured, unproven addresses, and the eth proof itself."""

from __future__ import annotations

import dataclasses
import secrets
import time

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from nectar.client.config import ClientConfig
from nectar.client.routing.sequence_manager import UNMEASURED_LATENCY
from nectar.node.identity import load_or_create_p2p_identity
from nectar.wire import eip712
from nectar.wire.announce import (
    MAX_RECORD_EXPIRY,
    AnnouncementValidator,
    ServerInfo,
    eth_proof_valid,
    record_fresh,
    sign_eth_proof,
)
from nectar.wire.identity import peer_id_of
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


def test_a_peer_that_failed_a_session_loses_its_ties_after_its_ban_and_a_fresh_ping():
    """A sybil answers pings fast (so it looks like the best hop) but black-holes steps: once it failed, its failure
    score keeps it behind an honest node that served steps, after its ban is over and a new ping answered fast."""
    sybil, honest = _peer(1), _peer(2)
    manager = _manager({sybil: _info(0, 8, throughput=1e9), honest: _info(0, 8, throughput=100)})
    manager.config = ClientConfig(step_timeout=60.0)
    manager._latency = {honest: 0.01, sybil: 0.001}
    assert manager.make_inference_route()[0].peer_id == sybil  # unknown yet: it wins on latency
    manager.ban(sybil, "timed out", timeout=60.0)
    manager.mark_ok(honest)
    manager._banned_until.clear()  # the ban is over...
    manager._latency = {honest: 0.01, sybil: 0.001}  # ...and it answered a fresh ping, faster than the honest node
    assert manager.failure_rate(sybil) == pytest.approx(0.5)
    assert manager.make_inference_route()[0].peer_id == honest
    for _ in range(3):
        assert manager.make_training_route()[0].peer_id in (honest, sybil)
    # the score decays slowly: half an hour later it still costs the sybil its ties
    manager._record[sybil][2] -= 1800.0
    assert 0.3 < manager.failure_rate(sybil) < 0.5
    assert manager.make_inference_route()[0].peer_id == honest


def test_one_failure_of_a_node_that_served_many_steps_costs_it_little():
    peer = _peer(1)
    manager = _manager({peer: _info(0, 8)})
    for _ in range(99):
        manager.mark_ok(peer)
    manager.ban(peer, "a transient error")
    assert manager.failure_rate(peer) < 0.011


def test_a_direct_lane_not_checked_on_the_peers_host_is_not_used():
    peer = _peer(1)
    lane = dataclasses.replace(_info(0, 8), direct_address="10.9.9.9:4444")
    manager = _manager({peer: lane})
    assert manager.make_inference_route()[0].info.direct_address == ""  # not checked: P2P only
    manager._lanes[peer] = "10.9.9.9:4444"  # its ping found the lane on the host P2P reaches the peer at
    assert manager.make_inference_route()[0].info.direct_address == "10.9.9.9:4444"


def test_dht_peers_refuse_records_that_expire_past_the_cap(tmp_path):
    key = load_or_create_p2p_identity(tmp_path / "k.key")
    validator = AnnouncementValidator(key)
    subkey = MSGPackSerializer.dumps(peer_id_of(key).to_bytes())

    def record(expires_in):
        unsigned = DHTRecord(b"key", subkey, b"value", get_dht_time() + expires_in)
        return dataclasses.replace(unsigned, value=validator.sign_value(unsigned))

    assert validator.validate(record(30))
    assert validator.validate(record(MAX_RECORD_EXPIRY - 5))
    assert not validator.validate(record(86400))  # validly signed, but would outlive its signer for a day
