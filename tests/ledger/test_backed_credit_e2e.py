"""Backed credit end to end (issues 20 and 22): a real ``nectar node`` reporting to a real ledger on a real Anvil works
only against escrow it checked: a client whose vouchers nothing backs on chain gets no step at all (before issue 22:
its credit limit's worth, and as much again for every fresh address), and is told how to reserve; once the client
reserves escrow for that node, the node serves it."""

from __future__ import annotations

import time

import pytest
import torch

from nectar.client import PaymentRequiredError
from tests.ledger.market import NUM_BLOCKS, SwarmMarket
from tests.ledger.utils import Party

pytestmark = pytest.mark.slow
PRICE = 10**12  # credit wei per token per block
STEP = PRICE * NUM_BLOCKS  # one decoded token through the whole span
LIMIT = 20 * STEP  # the node's credit limit: a prompt of 6 and a few tokens, not a whole generation


@pytest.fixture(scope="module")
def market(tmp_path_factory, contracts_snapshot, monkeypatch_module):
    home = tmp_path_factory.mktemp("backed-credit")
    market = SwarmMarket(home, price=PRICE)
    try:
        monkeypatch_module.setenv("NECTAR_DEPLOYMENT", str(market.deployment.deployment_path))
        market.deployment.start_ledger()  # the node asks it for backing; no worker needed
        market.node = market.add_node("node-a", (0, NUM_BLOCKS), account=0, extra_args=("--credit-limit", str(LIMIT)))
        market.wait_for_swarm()
        yield market
    finally:
        market.stop()


def _generate(market, client, tokens: int) -> int:
    """Generates ``tokens`` after a prompt of 6; returns how many receipts the node sent (also when refused)."""
    model = market.client_model(client)
    try:
        out = model.generate(torch.arange(3, 9).unsqueeze(0), max_new_tokens=tokens, do_sample=False)
        assert out.shape == (1, 6 + tokens)
    finally:
        model.shutdown()
        served = len(model.wallet.receipts)
    return served


def test_rotating_throwaway_addresses_gets_no_free_steps(market):
    """Issue 22: each fresh address was a new client with the node's whole credit limit (20 steps here), so
    rotating addresses got unlimited free work. Now a client nothing backs gets no step, whatever its address: the
    bound is the node's --free-credit-per-hour, shared by all unbacked clients (0 by default)."""
    served = []
    for _ in range(3):
        served.append(0)
        with pytest.raises(PaymentRequiredError) as refused:
            model = market.client_model(Party())
            try:
                model.generate(torch.arange(3, 9).unsqueeze(0), max_new_tokens=30, do_sample=False)
            finally:
                model.shutdown()
                served[-1] = len(model.wallet.receipts)
        assert "nectar escrow reserve" in str(refused.value)
    assert served == [0, 0, 0], f"throwaway addresses were served {served} steps on no escrow"


def test_node_refuses_an_unbacked_client_and_serves_a_backed_one(market):
    chain, client = market.chain, market.clients[1]
    key = "0x" + bytes(client.key).hex()
    chain.deposit(key, 10**18)  # escrow alone backs nothing at this node: it could pay any node, or leave
    with pytest.raises(PaymentRequiredError) as refused:
        _generate(market, client, 40)
    assert f"nectar escrow reserve --node {market.node.eth_address}" in str(refused.value)

    chain.reserve(key, market.node.eth_address, 10**17)
    # the ledger reuses a pair's chain read for chain_read_cache_s (2 s) and the node asks it again at most every
    # 0.5 s per client (BackingCache.min_interval)
    time.sleep(2.5)
    _generate(market, client, 40)  # now the node serves the whole generation against the reserve
