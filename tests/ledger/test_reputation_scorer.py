"""``ReputationScorer`` (client routing) against a real ledger over HTTP: reputable nodes get cheaper, penalized ones
far dearer, unknown and new ones neutral with a share of exploration, price counts, and a ledger that is down or
changes its mind is handled."""

from __future__ import annotations

import threading

import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nectar.client import ClientConfig
from nectar.client.routing import ReputationScorer
from nectar.client.routing.reputation import NEUTRAL_SCORE
from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.service.db import get_engine, session_scope
from nectar.wire.announce import ServerInfo, ServerState
from nectar.wire.identity import peer_id_of
from tests.ledger.utils import Party, free_port, make_receipt, receipt_item, wait_for

PRICE = 10**12
GOOD, BAD, FRESH, FRESH_CHEATER, UNKNOWN = (Party() for _ in range(5))


def info(party: Party, price: int = PRICE) -> ServerInfo:
    return ServerInfo(
        state=ServerState.ONLINE,
        start=0,
        end=4,
        throughput=100.0,
        inference_rps=100.0,
        forward_rps=100.0,
        network_rps=1000.0,
        dtype="float32",
        cache_tokens_left=10_000,
        price_per_token=price,
        eth_address=party.address,
    )


def peer():
    return peer_id_of(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """``nectar ledger``'s app served by uvicorn on a real port, with four nodes' histories in its database."""
    from nectar.ledger.service import create_app

    home = tmp_path_factory.mktemp("reputation")
    settings = Settings(
        database_url=f"sqlite:///{home / 'ledger.db'}",
        broker_url=f"sqla+sqlite:///{home / 'b.db'}",
        deployment_path=home / "none.json",
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the ledger to serve")
    url = f"http://127.0.0.1:{server.config.port}"
    import httpx

    client = Party()
    for node, count in ((GOOD, 150), (BAD, 150), (FRESH, 5), (FRESH_CHEATER, 5)):
        items = [receipt_item(*make_receipt(node, client, step=i, price=PRICE)) for i in range(count)]
        assert httpx.post(f"{url}/v1/receipts", json={"receipts": items}).json()["accepted"] == count
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:  # verdicts the spot checker and slash round would have recorded
        good, bad, cheater = (crud.get_node(session, address=p.address) for p in (GOOD, BAD, FRESH_CHEATER))
        for row in (good, bad):  # their clients countersigned and paid for the work (test_unforgeable_reputation)
            row.work_steps, row.work_amount = 150, 150 * 4 * PRICE
        good.spot_passed, good.uptime_ok, good.uptime_checks = 20, 50, 50
        bad.spot_passed, bad.spot_failed, bad.slashes = 17, 3, 3
        cheater.spot_failed = 1
    yield {"url": url, "engine": engine}
    server.should_exit = True
    thread.join(10)


def test_reputable_nodes_are_cheaper_and_penalized_ones_far_dearer(ledger):
    scorer = ReputationScorer(ledger["url"], exploration=0.0)
    try:
        factors = {
            name: scorer.cost_factor(peer(), info(party))
            for name, party in (
                ("good", GOOD),
                ("bad", BAD),
                ("fresh", FRESH),
                ("fresh_cheater", FRESH_CHEATER),
                ("unknown", UNKNOWN),
            )
        }
    finally:
        scorer.close()
    assert factors["fresh"] == factors["unknown"] == pytest.approx(1.0)  # new or unknown: neutral, speed decides
    assert factors["good"] < 1.0
    assert factors["bad"] > 100 * factors["good"]
    # a node with few receipts but a failed spot check is judged by its score, not treated as new
    assert factors["fresh_cheater"] > 1.5
    assert scorer.is_new(FRESH.address) and scorer.is_new(UNKNOWN.address) and not scorer.is_new(FRESH_CHEATER.address)


def test_price_counts_against_the_median_of_announced_prices(ledger):
    scorer = ReputationScorer(ledger["url"], exploration=0.0)
    try:
        peers, prices = [peer() for _ in range(3)], [PRICE // 2, PRICE, 4 * PRICE]
        for p, price in zip(peers, prices):  # the swarm as routing sees it: the median announced price is PRICE
            scorer.cost_factor(p, info(UNKNOWN, price=price))
        cheap, normal, dear = (scorer.cost_factor(p, info(UNKNOWN, price=price)) for p, price in zip(peers, prices))
        assert normal == pytest.approx(1.0)  # the median price keeps the speed-based cost
        assert cheap < normal < dear
        # a reputable node may ask more and still be preferred over an unknown one at the median price
        assert scorer.cost_factor(peer(), info(GOOD, price=PRICE + PRICE // 10)) < normal
        # price alone cannot rescue a penalized node
        assert scorer.cost_factor(peer(), info(BAD, price=0)) > 10 * dear
    finally:
        scorer.close()
    free = ReputationScorer(ledger["url"], exploration=0.0, price_weight=0.0)
    try:
        assert free.cost_factor(peer(), info(UNKNOWN, price=100 * PRICE)) == pytest.approx(1.0)
    finally:
        free.close()


def test_new_nodes_are_explored_at_the_configured_rate_and_penalized_ones_never(ledger):
    scorer = ReputationScorer(ledger["url"], exploration=0.25, seed=1)
    try:
        draws = 2000
        new_peer, cheater_peer, good_peer = peer(), peer(), peer()
        explored = penalized_explored = good_explored = 0
        for _ in range(draws):
            scorer.begin_route()
            explored += scorer.cost_factor(new_peer, info(UNKNOWN)) < 0.5
            penalized_explored += scorer.cost_factor(cheater_peer, info(FRESH_CHEATER)) < 0.5
            good_explored += scorer.cost_factor(good_peer, info(GOOD)) < 0.5
        # one route sees one decision: repeated calls without begin_route() agree
        first = scorer.cost_factor(new_peer, info(UNKNOWN))
        assert all(scorer.cost_factor(new_peer, info(UNKNOWN)) == first for _ in range(50))
    finally:
        scorer.close()
    assert 0.2 * draws < explored < 0.3 * draws
    assert penalized_explored == 0 and good_explored == 0


def test_scores_are_refreshed_in_the_background(ledger):
    scorer = ReputationScorer(ledger["url"], exploration=0.0, refresh_period=0.2)
    try:
        assert scorer.cost_factor(peer(), info(FRESH)) == pytest.approx(1.0)
        with session_scope(ledger["engine"]) as session:
            crud.record_slash(session, node=FRESH.address)  # the ledger learns of a slash
        wait_for(lambda: scorer.cost_factor(peer(), info(FRESH)) > 2.0, 10, "the scorer to see the slash")
    finally:
        scorer.close()
        with session_scope(ledger["engine"]) as session:
            crud.get_node(session, address=FRESH.address).slashes = 0


def test_a_ledger_that_is_down_leaves_routing_on_speed_and_price(ledger, caplog):
    scorer = ReputationScorer(f"http://127.0.0.1:{free_port()}", exploration=0.0, timeout=1.0)
    try:
        assert "Could not read reputation" in caplog.text
        assert scorer.cost_factor(peer(), info(BAD)) == pytest.approx(1.0)  # unknown: neutral, never an exception
        assert scorer.reputation(BAD.address) is None
    finally:
        scorer.close()


def test_from_client_config(ledger):
    with pytest.raises(ValueError, match="ledger_url"):
        ReputationScorer.from_config(ClientConfig())
    scorer = ReputationScorer.from_config(ClientConfig(ledger_url=ledger["url"]), exploration=0.0)
    try:
        assert scorer.reputation(GOOD.address).score > NEUTRAL_SCORE
    finally:
        scorer.close()
