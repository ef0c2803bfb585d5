"""Issue 20's devnet run, through the CLI: an operator registers, stakes, serves, earns, unbonds and withdraws.

One chain (Anvil + the contracts), ``nectar ledger`` and ``nectar worker`` (a real Celery worker: settlement runs
there), and a one-node swarm. Every step of the operator is a ``nectar operator`` subprocess on the node's key
folder; the node refuses to start before registration; a client paying through the ledger (stake gate on) gets
served once it is registered; the epoch settles on chain; the operator unbonds (locked until the unbond delay passes
on the chain's clock) and withdraws its stake and its earnings.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nectar.client import ClientConfig
from tests.ledger.market import SwarmMarket

pytestmark = pytest.mark.slow
PRICE = 10**12
STAKE = 150  # credits, above the devnet minimum of 100
ETHER = 10**18


def operator(market, key_dir, *args: str, ok: bool = True) -> str:
    """``nectar operator ...`` as an operator types it; returns what it printed (stdout and stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "nectar.cli", "operator", *args, "--key-dir", str(key_dir)],
        env={**os.environ, **market.deployment.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert (done.returncode == 0) == ok, f"exit {done.returncode}:\n{out}"
    return out


@pytest.fixture(scope="module")
def market(tmp_path_factory, contracts_snapshot, monkeypatch_module):
    home = tmp_path_factory.mktemp("operator-devnet")
    market = SwarmMarket(home, price=PRICE, model_name="tiny-operator-llama")
    try:
        monkeypatch_module.setenv("NECTAR_DEPLOYMENT", str(market.deployment.deployment_path))
        market.deployment.start_ledger()
        market.deployment.start_worker()
        yield market
    finally:
        if getattr(market, "model", None) is not None:
            market.model.shutdown()
        market.stop()


def test_an_operator_registers_stakes_serves_earns_unbonds_and_withdraws(market):
    chain, key_dir = market.chain, market.swarm.workdir / "keys" / "operated"

    # a new operator: the command makes the node's keys (the node will use them) and says what is missing
    out = operator(market, key_dir, "status")
    assert "registered:    no" in out and "nectar operator register" in out
    address = out.split("node address:")[1].split()[0]
    out = operator(market, key_dir, "register", "--yes", ok=False)
    assert "for gas" in out or "not enough credits" in out

    # unregistered, the node refuses to start earning
    with pytest.raises(RuntimeError, match="nectar operator register --key-dir"):
        market.add_node("operated", (0, 4), register=False)

    # the operator buys credits and ETH (here: the devnet deployer sends them)
    deployer = chain.default_key()
    chain.send_eth(deployer, address, ETHER)
    chain.faucet(address, 1_000 * ETHER, private_key=deployer)
    out = operator(market, key_dir, "register", "--stake", "50", "--yes", ok=False)
    assert "below minimum stake" in out
    out = operator(market, key_dir, "register", "--stake", str(STAKE - 50), "--yes")
    assert "registered:    yes" in out and "bonded stake:  100 credits" in out
    out = operator(market, key_dir, "stake", "--amount", "50", "--yes")
    assert f"bonded stake:  {STAKE} credits" in out and "earning:       yes" in out
    assert chain.stake_of(address) == STAKE * ETHER

    # it serves: a client paying through the ledger (stake gate on by default) routes to it
    node = market.add_node("operated", (0, 4), register=False)
    assert node.eth_address == address
    market.wait_for_swarm()
    client = market.clients[0]
    market.fund(client, ETHER)
    market.model = market.client_model(client, config=ClientConfig(ledger_url=market.url))
    for seed in range(3):
        prompt = torch.randint(3, 1000, (1, 4), generator=torch.Generator().manual_seed(seed))
        market.model.generate(prompt, max_new_tokens=3)
    receipts = market.model.wallet.receipts
    assert receipts and {r.receipt.node for r in receipts} == {address}

    # it earns: the epoch settles on chain through the worker
    market.wait_for_payments(market.model.wallet)
    market.close_and_settle()
    earned = chain.node_balance(address)
    gross = sum(r.receipt.amount for r in receipts)
    fee_bps = chain.deployment.params["fee_bps"]
    assert earned == gross - gross * fee_bps // 10_000 > 0
    out = operator(market, key_dir, "status")
    assert "earnings:      0 credits" not in out and "open cases:    0" in out

    # it unbonds: the stake stops counting at once, and is locked until the unbond delay has passed
    out = operator(market, key_dir, "unbond", "--all", "--yes")
    assert "bonded stake:  0 credits" in out and f"unbonding:     {STAKE} credits, unlocks" in out
    assert "earning:       NO" in out
    assert chain.stake_of(address) == 0
    out = operator(market, key_dir, "withdraw", "--what", "stake", "--yes", ok=False)
    assert "unbond locked until" in out

    # it withdraws stake and earnings once the delay has passed (the devnet's clock is moved on)
    credits_before = chain.credit_balance(address)
    chain.advance_time(int(chain.registry.functions.unbondDelay().call()) + 1)
    out = operator(market, key_dir, "withdraw", "--yes")
    assert "unbonding:     none" in out and "earnings:      0 credits" in out
    assert chain.credit_balance(address) - credits_before == STAKE * ETHER + earned
    assert chain.node_balance(address) == 0
