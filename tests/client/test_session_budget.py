"""A session's cost meter and budget against in-memory nodes (the harness of test_inference_session_unit.py): the
meter counts exactly the receipts its own session accepted, failover replays included, on a wallet other sessions
share; a budget stops a session before a step or a replay it cannot pay for, and nothing of it reaches a node."""

from __future__ import annotations

import pytest

from nectar.client import BudgetExceededError, CostMeter, InferenceSession, RouteTooExpensiveError
from nectar.client.config import ClientConfig
from nectar.client.hop_stream import HopStream
from nectar.client.payments import Wallet
from tests.client.test_inference_session_unit import (
    DOMAIN,
    MODEL,
    FakeManager,
    FakeNode,
    LoopRuntime,
    Network,
    _chunks,
    _eventually,
)

ROUTE_PRICE = 4  # the fake nodes charge 1 wei per token per block; the toy model has 4 blocks


@pytest.fixture
def loop():
    runtime = LoopRuntime()
    yield runtime
    runtime.stop()


def _open(runtime, network, wallet, meter, *, max_length=32) -> InferenceSession:
    config = ClientConfig(step_timeout=2.0, connect_timeout=2.0, max_retries=3)
    return InferenceSession(
        FakeManager(network),
        runtime,
        wallet,
        max_length=max_length,
        config=config,
        streams=lambda span: HopStream(runtime, span, MODEL, connect=network.connect),
        meter=meter,
    )


def test_the_meter_counts_its_own_receipts_replays_included_on_a_shared_wallet(loop):
    network = Network()
    network.add(FakeNode("a", 0, 2))
    network.add(FakeNode("b", 2, 4, dies_at=3))
    spare = network.add(FakeNode("spare", 2, 4))
    wallet = Wallet(domain=DOMAIN)
    other = CostMeter()
    with _open(loop, network, wallet, other) as neighbour:  # another generation on the same wallet
        neighbour.step(_chunks(1)[0])
    meter = CostMeter()
    chunks = _chunks(6)
    before = len(wallet.receipts)
    with _open(loop, network, wallet, meter) as session:
        for x in chunks:
            session.step(x)
    assert session.failovers == 1
    mine = [r.receipt for r in wallet.receipts[before:]]
    replays = [r for r in mine if r.node == spare.info.eth_address and r.step < 3]
    assert len(replays) == 3  # steps 0-2 replayed to the spare were paid, and counted
    assert meter.spent == sum(r.amount for r in mine) and meter.receipts == len(mine)
    assert other.spent == 5 * ROUTE_PRICE and wallet.total_paid == meter.spent + other.spent
    # steps 0-2 (7 tokens) and 3 through 4 blocks; the replay of 7 tokens through the spare's 2 blocks; step 3 again
    # from the spare; steps 4-5 through 4 blocks. b died on step 3 before its receipt of step 2 (due with the answer
    # to 3) came: its steps 2 and 3 were committed, never paid
    assert meter.committed == (7 + 1) * 4 + 7 * 2 + 1 * 2 + 2 * 4
    assert meter.spent == meter.committed - 2 * 2
    assert meter.settle(timeout=5) == meter.spent


def test_a_budget_stops_the_session_before_the_step_it_cannot_pay(loop):
    network = Network()
    first, second = network.add(FakeNode("a", 0, 2)), network.add(FakeNode("b", 2, 4))
    meter = CostMeter(8 * ROUTE_PRICE + 8)  # 8 positions at the route's price, and 8 wei more
    chunks = _chunks(4)
    with _open(loop, network, Wallet(domain=DOMAIN), meter, max_length=8) as session:
        meter.commit(9, "another prompt of the request")  # a session sharing the meter spent a little more
        for x in chunks[:3]:
            session.step(x)
        with pytest.raises(BudgetExceededError, match="step 3 would cost 4 wei"):
            session.step(chunks[3])
    assert len(first.steps) == len(second.steps) == 3  # the refused step reached no node
    _eventually(lambda: meter.receipts == 6)
    assert meter.spent == 7 * ROUTE_PRICE and meter.committed == meter.spent + 9 <= meter.max_cost_wei


def test_a_replay_past_the_budget_is_not_sent(loop):
    network = Network()
    network.add(FakeNode("a", 0, 2))
    network.add(FakeNode("b", 2, 4, dies_at=2))
    spare = network.add(FakeNode("spare", 2, 4))
    meter = CostMeter((5 + 1 + 1 + 1) * ROUTE_PRICE)  # enough for 4 steps without a failover, not for a replay
    chunks = _chunks(4)
    with _open(loop, network, Wallet(domain=DOMAIN), meter, max_length=8) as session:
        session.step(chunks[0])
        session.step(chunks[1])
        with pytest.raises(BudgetExceededError, match="failover's replay"):
            session.step(chunks[2])
    assert spare.steps == [] and meter.spent <= meter.committed <= meter.max_cost_wei


def test_no_route_dearer_than_the_budget_allows_per_token_is_opened(loop):
    network = Network()
    network.add(FakeNode("a", 0, 4))
    with pytest.raises(RouteTooExpensiveError):  # the fake manager ignores caps: the session checks it itself
        _open(loop, network, Wallet(domain=DOMAIN), CostMeter(10 * ROUTE_PRICE - 1), max_length=10)
