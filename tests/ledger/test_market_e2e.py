"""End to end on a real Anvil, real swarm processes and a real Celery worker: a client generates, receipts and
vouchers flow to the ledger, an epoch closes, nodes' on-chain balances rise by exactly what the client was charged
(minus the fee), and the client's escrow falls by the same."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from nectar.wire.eip712 import receipt_leaf
from nectar.wire.merkle import merkle_proof
from tests.ledger.market import SwarmMarket

pytestmark = pytest.mark.slow
PRICE = 10**12  # credit wei per token per block
DEPOSIT = 10**18


@pytest.fixture(scope="module")
def market(tmp_path_factory, contracts_snapshot, monkeypatch_module):
    home = tmp_path_factory.mktemp("market-e2e")
    market = SwarmMarket(home, price=PRICE)
    try:
        monkeypatch_module.setenv("NECTAR_DEPLOYMENT", str(market.deployment.deployment_path))  # the client's domain
        market.deployment.start_ledger()
        market.deployment.start_worker()
        market.add_node("node-a", (0, 2), account=0)
        market.add_node("node-b", (2, 4), account=1)
        market.wait_for_swarm()
        market.client = market.clients[0]
        market.fund(market.client, DEPOSIT)
        market.model = market.client_model(market.client)
        yield market
    finally:
        if getattr(market, "model", None) is not None:
            market.model.shutdown()
        market.stop()


def balances(market) -> tuple[dict[str, int], int, int]:
    chain = market.chain
    nodes = {n.eth_address: chain.node_balance(n.eth_address) for n in market.swarm.nodes}
    treasury = chain.deployment.accounts_with_role("treasury")[0]["address"]
    return nodes, chain.escrow_balance(market.client.address), chain.node_balance(treasury)


def generate(market, *, sessions: int, new_tokens: int, seed: int) -> list:
    """Runs ``sessions`` generations; returns the receipts the wallet checked for them."""
    wallet, before = market.model.wallet, len(market.model.wallet.receipts)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(sessions):
        prompt = torch.randint(3, 1000, (1, 6), generator=generator)
        out = market.model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        assert out.shape == (1, 6 + new_tokens)
    return wallet.receipts[before:]


def settle_and_measure(market, receipts) -> dict:
    nodes_before, escrow_before, treasury_before = balances(market)
    market.wait_for_payments(market.model.wallet)
    epoch = market.close_and_settle()
    nodes_after, escrow_after, treasury_after = balances(market)
    gross = Counter()
    for r in receipts:
        gross[r.receipt.node] += r.receipt.amount
    return dict(
        epoch=epoch,
        gross=gross,
        charged=sum(gross.values()),
        escrow_fell=escrow_before - escrow_after,
        earned={n: nodes_after[n] - nodes_before[n] for n in nodes_before},
        fee=treasury_after - treasury_before,
    )


def test_a_paid_generation_settles_on_chain_to_the_wei(market):
    receipts = generate(market, sessions=2, new_tokens=8, seed=0)
    wallet = market.model.wallet
    assert receipts and wallet.total_paid == sum(r.receipt.amount for r in receipts)
    # every hop of every step is a receipt: 2 sessions x (prefill + 7 decode steps) x 2 nodes
    assert len(receipts) == 2 * 8 * 2
    assert {r.receipt.node for r in receipts} == {n.eth_address for n in market.swarm.nodes}
    result = settle_and_measure(market, receipts)
    fee_bps = market.chain.deployment.params["fee_bps"]
    epoch, gross = result["epoch"], result["gross"]

    # the ledger stored exactly the receipts the client checked, and the epoch's root covers them
    leaves = [receipt_leaf(r.receipt) for r in receipts]
    assert market.stored_leaves(wallet.address) == set(leaves)
    assert epoch["receipt_count"] == len(receipts) and int(epoch["total_amount"]) == wallet.total_paid
    assert market.chain.verify_inclusion(epoch["number"], receipts[3].receipt, merkle_proof(leaves, 3))

    # the chain moved exactly what the client was charged: escrow down by it, nodes up by it minus the fee
    assert result["charged"] == wallet.total_paid == result["escrow_fell"]
    for node, amount in gross.items():
        assert result["earned"][node] == amount - amount * fee_bps // 10_000
        assert market.chain.paid(wallet.address, node, wallet.channel_id, wallet.partner_of(node)) == amount
    first, second = gross  # the route's two nodes: the wallet paired their channels into one storage slot
    assert (wallet.partner_of(first), wallet.partner_of(second)) == (second, first)
    assert result["fee"] == sum(a * fee_bps // 10_000 for a in gross.values()) > 0
    assert sum(result["earned"].values()) + result["fee"] == wallet.total_paid
    print(
        f"\ne2e epoch {epoch['number']}: {len(receipts)} receipts, client charged {wallet.total_paid} wei, "
        f"nodes earned {dict(result['earned'])}, fee {result['fee']}"
    )
    market.first_total = wallet.total_paid


def test_cumulative_vouchers_settle_only_the_increment_in_the_next_epoch(market):
    receipts = generate(market, sessions=1, new_tokens=5, seed=1)
    wallet = market.model.wallet
    assert wallet.total_paid == market.first_total + sum(r.receipt.amount for r in receipts)
    result = settle_and_measure(market, receipts)
    fee_bps = market.chain.deployment.params["fee_bps"]
    assert result["epoch"]["receipt_count"] == len(receipts) == 5 * 2
    assert result["escrow_fell"] == result["charged"] == wallet.total_paid - market.first_total
    for node, amount in result["gross"].items():
        assert result["earned"][node] == amount - amount * fee_bps // 10_000
    cumulative = Counter()
    for r in wallet.receipts:
        cumulative[r.receipt.node] += r.receipt.amount
    for node, amount in cumulative.items():  # the channel's cumulative voucher is what the chain has paid in total
        assert market.chain.paid(wallet.address, node, wallet.channel_id, wallet.partner_of(node)) == amount
