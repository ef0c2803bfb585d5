"""The stake gate and stake weight in route choice, on a fixed swarm view (the ledger's stake table given directly;
tests/ledger/test_stake_gate.py runs the same against Anvil, a ledger and real nodes)."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from nectar.client.routing import MissingBlocksError, ReputationScorer
from nectar.client.routing.scoring import STAKE_CAP, stake_factor
from nectar.wire.ledger_api import NodeStake, StakeTable
from tests.client.test_routing import _info, _manager, _peer

MIN = 100 * 10**18


def _address(i: int) -> str:
    return "0x" + f"{i:02x}" * 20


def _node(i: int, peer, *, bonded=MIN, unbonding=0, registered=True) -> NodeStake:
    return NodeStake(_address(i), registered, str(peer), bonded, unbonding, 0, MIN)


@pytest.fixture
def scorer():
    # an unreachable ledger: the table is set by hand below (no reputation, so only stake and speed count)
    scorer = ReputationScorer("http://127.0.0.1:9", exploration=0.0, refresh_period=3600, require_stake=True)
    yield scorer
    scorer.close()


def _fixed(manager):
    manager.update = lambda force=False: None  # no DHT: the view stays as given
    return manager


def _table(*nodes: NodeStake) -> StakeTable:
    return StakeTable(MIN, {n.address.lower(): n for n in nodes})


def _staked_info(i: int, start=0, end=8, throughput=100.0):
    return dataclasses.replace(_info(start, end, throughput), eth_address=_address(i))


def test_stake_factor_is_concave_and_capped():
    assert stake_factor(MIN, MIN) == 1.0
    assert stake_factor(MIN // 2, MIN) == 1.0  # below the minimum the gate decides, not the weight
    assert stake_factor(4 * MIN, MIN) == pytest.approx(4**-0.25)
    # each doubling buys less: concave
    gains = [stake_factor(k * MIN, MIN) - stake_factor(2 * k * MIN, MIN) for k in (1, 2, 4)]
    assert gains[0] > gains[1] > gains[2] > 0
    # a whale gets no more than the cap: at most 2x cheaper than a node at the minimum
    assert stake_factor(10**6 * MIN, MIN) == stake_factor(int(STAKE_CAP) * MIN, MIN) == pytest.approx(0.5)
    assert stake_factor(10**6 * MIN, MIN, weight=0) == 1.0


def test_stake_weighs_in_route_choice(scorer):
    small, whale = _peer(1), _peer(2)
    scorer._stakes = _table(_node(1, small), _node(2, whale, bonded=1000 * MIN))
    manager = _manager({small: _staked_info(1), whale: _staked_info(2)}, scorer=scorer)
    assert manager.make_inference_route()[0].peer_id == whale  # equally fast: stake breaks the tie
    # the cap: a node twice as fast at the minimum stake still beats a whale at 1000x
    fast = _manager({small: _staked_info(1, throughput=250.0), whale: _staked_info(2)}, scorer=scorer)
    # speeds count once the client has measured them (issue 22)
    fast._observed, fast._latency = {small: 250.0, whale: 100.0}, {small: 0.005, whale: 0.005}
    assert fast.make_inference_route()[0].peer_id == small
    # training routes draw in proportion: the whale gets more, never all
    counts = collections.Counter(manager.make_training_route()[0].peer_id for _ in range(400))
    assert counts[whale] > counts[small] > 50


def test_gate_keeps_unregistered_unbonding_and_borrowed_addresses_out(scorer):
    staked, unregistered, unbonding, impostor = _peer(1), _peer(2), _peer(3), _peer(4)
    scorer._stakes = _table(_node(1, staked), _node(3, unbonding, bonded=0, unbonding=MIN))
    servers = {
        staked: _staked_info(1, 0, 4, throughput=10.0),
        unregistered: _staked_info(2, 0, 8, throughput=1000.0),
        unbonding: _staked_info(3, 0, 8, throughput=1000.0),
        impostor: _staked_info(1, 4, 8, throughput=1000.0),  # announces the staked node's address
    }
    manager = _fixed(_manager(servers, scorer=scorer))
    with pytest.raises(MissingBlocksError) as caught:
        manager.make_inference_route()
    assert caught.value.blocks == [4, 5, 6, 7]
    reasons = caught.value.unstaked
    assert "not registered" in reasons[str(unregistered)]
    assert "below the minimum" in reasons[str(unbonding)]
    assert "registered under peer id" in reasons[str(impostor)]
    assert "nectar operator register" in str(caught.value) and "--no-require-stake" in str(caught.value)
    assert [s.peer_id for s in manager.make_inference_route(0, 4)] == [staked]
    # the gate off (a private swarm): the fastest peers are used again
    scorer.require_stake = False
    assert manager.make_inference_route()[0].peer_id in (unregistered, unbonding)


def test_gate_fails_closed_until_the_table_is_read(scorer):
    peer = _peer(1)
    manager = _fixed(_manager({peer: _staked_info(1)}, scorer=scorer))
    with pytest.raises(MissingBlocksError, match="could not be read yet"):
        manager.make_inference_route()
