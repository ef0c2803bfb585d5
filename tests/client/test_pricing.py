"""Route prices, the price cap on route finding, and the cost meter's budget (``nectar.client.pricing``), on a given
swarm view. The meter against real nodes' receipts, failover replays included, is tests/api/test_route_pricing.py."""

from __future__ import annotations

import threading

import pytest

from nectar.client import BudgetExceededError, CostMeter, Quote, RouteTooExpensiveError, route_price
from tests.client.test_routing import _info, _manager, _peer


def test_route_price_is_price_times_blocks_summed_over_spans():
    fast, left, right = _peer(1), _peer(2), _peer(3)
    manager = _manager(
        {fast: _info(0, 8, 1000, price=50), left: _info(0, 4, 10, price=1), right: _info(4, 8, 10, price=2)}
    )
    route = manager.make_inference_route()
    assert [s.peer_id for s in route] == [fast] and route_price(route) == 8 * 50
    assert Quote(tuple(route), 400).worst_case(batch_size=4, max_length=10, replay_share=0.5) == 4 * 10 * 400 * 3 // 2


def test_a_capped_route_is_the_fastest_within_the_cap_or_refused():
    fast, left, right = _peer(1), _peer(2), _peer(3)
    manager = _manager(
        {fast: _info(0, 8, 1000, price=50), left: _info(0, 4, 10, price=1), right: _info(4, 8, 10, price=2)}
    )
    assert route_price(manager.make_inference_route(max_price=400)) == 400  # the fast one fits: taken
    cheap = manager.make_inference_route(max_price=399)
    assert [s.peer_id for s in cheap] == [left, right] and route_price(cheap) == 4 * 1 + 4 * 2
    with pytest.raises(RouteTooExpensiveError) as refused:
        manager.make_inference_route(max_price=11)
    assert (refused.value.price, refused.value.cap) == (12, 11)
    assert "costs 12 credit wei per token" in str(refused.value) and "nectar swarm" in str(refused.value)
    # a sub-route (a failover's) is priced over its own blocks
    assert route_price(manager.make_inference_route(4, 8, max_price=8)) == 8


def test_meter_never_commits_past_its_budget_and_counts_receipts():
    meter = CostMeter(1000, max_price=30)
    meter.commit(600, "step 0")
    with pytest.raises(BudgetExceededError) as stopped:
        meter.commit(401, "step 1")
    assert "step 1 would cost 401 wei" in str(stopped.value) and meter.committed == 600
    meter.commit(400, "step 1")
    assert meter.remaining == 0 and meter.price_cap(10) == 0
    assert CostMeter(1000, max_price=30).price_cap(10) == 30 and CostMeter(1000).price_cap(50) == 20
    assert CostMeter().price_cap(10) is None
    meter.opened()
    meter.accept(550)

    def close_later():
        meter.accept(450)
        meter.closed()

    timer = threading.Timer(0.2, close_later)
    timer.start()
    assert meter.settle(timeout=10) == 1000 and meter.receipts == 2  # waited for the session's last receipt
    with pytest.raises(BudgetExceededError, match="already settled"):
        _sealed().commit(1, "late step")


def _sealed() -> CostMeter:
    meter = CostMeter()
    meter.settle(timeout=0)
    return meter


def test_an_unfinished_session_is_settled_at_what_was_committed():
    meter = CostMeter(100)
    meter.opened()
    meter.commit(70, "step 0")
    meter.accept(30)
    assert meter.settle(timeout=0.05) == 70  # its last receipts may still come: never more than committed
