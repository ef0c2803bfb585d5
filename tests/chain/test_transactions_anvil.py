"""Sending on a real Anvil: two processes' worth of senders sharing one key (the ledger's service and worker do)
never lose a transaction to a nonce clash, and reverts surface as named ChainErrors before anything is sent."""

from __future__ import annotations

import threading

import pytest

from nectar.chain import Chain, ChainError

ETHER = 10**18


def test_concurrent_senders_sharing_a_key(devnet, roles):
    key = roles["deployer"][0]["privateKey"]
    target = roles["client"][0]["address"]
    chains = [Chain(devnet.deployment), Chain(devnet.deployment)]  # separate locks, as in separate processes
    before = chains[0].credit_balance(target)
    errors: list[BaseException] = []

    def send(chain: Chain) -> None:
        try:
            for _ in range(10):
                chain.faucet(target, ETHER, private_key=key)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(c,)) for c in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert chains[0].credit_balance(target) == before + 20 * ETHER


def test_revert_is_named_and_sends_nothing(chain, roles):
    key = roles["client"][0]["privateKey"]
    sender = roles["client"][0]["address"]
    nonce = chain.w3.eth.get_transaction_count(sender)
    with pytest.raises(ChainError, match=r"^FaucetCapExceeded\(requested=") as info:
        chain.faucet(sender, 10**30, private_key=key)
    assert info.value.error_args["cap"] == chain.deployment.params["faucet_cap"]
    with pytest.raises(ChainError, match=r"^NoEarnings"):
        chain.withdraw_earnings(key)
    assert chain.w3.eth.get_transaction_count(sender) == nonce
