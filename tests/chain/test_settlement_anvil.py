"""Settlement on a real Anvil: deposit, 100 vouchers signed with eth-account settled in one transaction, node
withdrawals that add up to the wei, and the rejections (replay, forged signature, over-spend) that lose nothing."""

from __future__ import annotations

import logging

import pytest
from eth_account import Account

from nectar.chain import ChainError
from tests.chain.signing import sign_voucher, voucher

logger = logging.getLogger(__name__)

ETHER = 10**18
DEPOSIT = 1_000 * ETHER
CLIENTS, NODES, CHANNELS = 4, 5, 5  # 4 x 5 x 5 = 100 vouchers


@pytest.fixture(scope="module")
def parties(chain, roles):
    """Four funded clients (three demo accounts and a fresh key) and five node addresses."""
    deployer = roles["deployer"][0]["privateKey"]
    fresh = Account.create()
    chain.send_eth(deployer, fresh.address, 10 * ETHER)
    chain.faucet(fresh.address, 10_000 * ETHER)
    clients = [a["privateKey"] for a in roles["client"]] + ["0x" + fresh.key.hex().removeprefix("0x")]
    nodes = [a["address"] for a in roles["node"]] + [Account.create().address for _ in range(NODES - 3)]
    node_keys = {a["address"]: a["privateKey"] for a in roles["node"]}
    return {"clients": clients, "nodes": nodes, "node_keys": node_keys, "submitter": roles["ledger"][0]["privateKey"]}


def _address(key: str) -> str:
    return Account.from_key(key).address


def _signed_batch(chain, parties, *, base: int, channel_offset: int = 0) -> list[tuple[dict, bytes]]:
    domain = chain.eip712_domain()
    out = []
    for client_key in parties["clients"]:
        for n, node in enumerate(parties["nodes"]):
            for ch in range(CHANNELS):
                v = voucher(_address(client_key), node, channel_offset + ch, base + n * 1_000 + ch)
                out.append((v, sign_voucher(domain, client_key, v)))
    return out


def test_deployment_and_domain(chain, devnet):
    assert chain.chain_id == 31337
    assert chain.eip712_domain() == {
        "name": "Nectar",
        "version": "1",
        "chainId": 31337,
        "verifyingContract": chain.address_of("Settlement"),
    }
    assert devnet.deployment_path.exists()
    # Settlement is the vault too: the Escrow entry is the same contract under the vault's ABI
    assert chain.address_of("Escrow") == chain.address_of("Settlement")
    assert chain.escrow.functions.credits().call() == chain.address_of("Credits")
    assert chain.registry.functions.slasher().call() == chain.address_of("Slashing")


def test_deposit_is_seen_by_watchers(chain, parties):
    start = chain.block_number()
    for key in parties["clients"]:
        before = chain.credit_balance(_address(key))
        result = chain.deposit(key, DEPOSIT)
        assert result.events_named("Deposited")[0]["args"]["amount"] == DEPOSIT
        assert chain.escrow_balance(_address(key)) == DEPOSIT
        assert chain.credit_balance(_address(key)) == before - DEPOSIT
    seen = chain.deposits_since(start)
    assert [d["client"] for d in seen] == [_address(k) for k in parties["clients"]]
    assert all(d["amount"] == DEPOSIT for d in seen)


def test_settle_100_vouchers_in_one_transaction(chain, parties):
    escrow = chain.address_of("Escrow")
    treasury = chain.settlement.functions.feeRecipient().call()
    fee_bps = chain.settlement.functions.feeBps().call()
    batch = _signed_batch(chain, parties, base=10**15)
    assert len(batch) == 100

    result = chain.settle(parties["submitter"], batch)
    logger.info("settled 100 vouchers: %d gas (%.0f per voucher)", result.gas_used, result.gas_used / 100)
    assert len(result.events_named("BatchSettled")) == 1

    owed: dict[str, int] = {}
    for v, _sig in batch:
        owed[v["node"]] = owed.get(v["node"], 0) + v["cumulativeAmount"]
        assert chain.paid(v["client"], v["node"], v["channelId"]) == v["cumulativeAmount"]
    for key in parties["clients"]:
        spent = sum(v["cumulativeAmount"] for v, _ in batch if v["client"] == _address(key))
        assert chain.escrow_balance(_address(key)) == DEPOSIT - spent
    fees = sum(gross * fee_bps // 10_000 for gross in owed.values())
    for node, gross in owed.items():
        assert chain.node_balance(node) == gross - gross * fee_bps // 10_000
    assert chain.node_balance(treasury) == fees

    # the vault holds exactly client balances plus unwithdrawn earnings
    held = sum(chain.escrow_balance(_address(k)) for k in parties["clients"]) + sum(map(chain.node_balance, owed))
    assert chain.credit_balance(escrow) == held + chain.node_balance(treasury)

    # nodes withdraw: every credit arrives, nothing more
    for node, key in parties["node_keys"].items():
        before = chain.credit_balance(node)
        chain.withdraw_earnings(key)
        assert chain.credit_balance(node) == before + owed[node] - owed[node] * fee_bps // 10_000
        assert chain.node_balance(node) == 0
    total_paid = sum(v["cumulativeAmount"] for v, _ in batch)
    clients_left = sum(chain.escrow_balance(_address(k)) for k in parties["clients"])
    assert clients_left == CLIENTS * DEPOSIT - total_paid


def test_next_epoch_pays_only_the_difference(chain, parties):
    node = parties["nodes"][0]
    client_key = parties["clients"][0]
    client = _address(client_key)
    already = chain.paid(client, node, 0)
    before_client, before_node = chain.escrow_balance(client), chain.node_balance(node)
    v = voucher(client, node, 0, already + 5 * 10**15)
    chain.settle(parties["submitter"], [(v, sign_voucher(chain.eip712_domain(), client_key, v))])
    assert chain.escrow_balance(client) == before_client - 5 * 10**15
    fee = 5 * 10**15 * chain.settlement.functions.feeBps().call() // 10_000
    assert chain.node_balance(node) == before_node + 5 * 10**15 - fee


def _state(chain, parties):
    clients = [_address(k) for k in parties["clients"]]
    return (
        [chain.escrow_balance(c) for c in clients],
        [chain.node_balance(n) for n in parties["nodes"]],
        chain.credit_balance(chain.address_of("Escrow")),
    )


def test_replayed_voucher_is_skipped(chain, parties):
    client_key, node = parties["clients"][1], parties["nodes"][1]
    v = voucher(_address(client_key), node, 0, chain.paid(_address(client_key), node, 0))
    signed = [(v, sign_voucher(chain.eip712_domain(), client_key, v))]
    before = _state(chain, parties)
    result = chain.settle(parties["submitter"], signed)
    assert [(s["voucher"], s["reason"]) for s in result.skipped] == [(0, "AlreadySettled")]
    assert _state(chain, parties) == before


def test_front_run_voucher_is_skipped_and_the_rest_settles(chain, parties):
    """Issue 20: one voucher of a pending batch settled first by someone else used to revert the whole batch."""
    domain = chain.eip712_domain()
    a, b = parties["clients"][0], parties["clients"][1]
    node = parties["nodes"][2]
    batch = [voucher(_address(a), node, 400, 10**15), voucher(_address(b), node, 400, 10**15)]
    batch.append(voucher(_address(a), node, 401, 2 * 10**15))
    signed = [(v, sign_voucher(domain, a if v["client"] == _address(a) else b, v)) for v in batch]
    start = chain.block_number() + 1
    chain.settle(parties["submitter"], [signed[2]])  # the front-runner's copy
    result = chain.settle(parties["submitter"], signed)
    assert [(s["voucher"], s["reason"]) for s in result.skipped] == [(2, "AlreadySettled")]
    assert chain.paid(_address(a), node, 400) == 10**15 and chain.paid(_address(b), node, 400) == 10**15
    last = chain.settlements_since(start)[-1]
    assert last["vouchers"] == [batch[0], batch[1]]  # grouped per client on chain: a's two, then b's
    assert [(s["voucher"], s["reason"]) for s in last["skipped"]] == [(batch[2], "AlreadySettled")]


def test_forged_signature_is_rejected(chain, parties):
    victim, node = _address(parties["clients"][2]), parties["nodes"][2]
    v = voucher(victim, node, 77, 10**18)
    forged = sign_voucher(chain.eip712_domain(), Account.create().key.hex(), v)
    before = _state(chain, parties)
    with pytest.raises(ChainError, match=r"^InvalidSignature"):
        chain.settle(parties["submitter"], [(v, forged)])
    assert chain.paid(victim, node, 77) == 0
    assert _state(chain, parties) == before


def test_signature_for_another_amount_is_rejected(chain, parties):
    client_key, node = parties["clients"][2], parties["nodes"][2]
    v = voucher(_address(client_key), node, 78, 10**15)
    sig = sign_voucher(chain.eip712_domain(), client_key, v)
    with pytest.raises(ChainError, match=r"^InvalidSignature"):
        chain.settle(parties["submitter"], [({**v, "cumulativeAmount": 10**18}, sig)])


def test_overspend_is_skipped(chain, parties):
    client_key, node = parties["clients"][3], parties["nodes"][3]
    client = _address(client_key)
    v = voucher(client, node, 99, chain.escrow_balance(client) + 1)
    before = _state(chain, parties)
    result = chain.settle(parties["submitter"], [(v, sign_voucher(chain.eip712_domain(), client_key, v))])
    assert [(s["voucher"], s["reason"]) for s in result.skipped] == [(0, "InsufficientEscrow")]
    assert chain.paid(client, node, 99) == 0
    assert _state(chain, parties) == before


def test_error_names_the_bad_voucher_in_the_callers_order(chain, parties):
    domain = chain.eip712_domain()
    a, b = parties["clients"][0], parties["clients"][1]
    node = parties["nodes"][4]
    good = [
        voucher(_address(a), node, 200, 10**15),
        voucher(_address(b), node, 200, 10**15),
        voucher(_address(a), node, 201, 10**15),
    ]
    signed = [(v, sign_voucher(domain, a if v["client"] == _address(a) else b, v)) for v in good]
    signed[2] = (signed[2][0], sign_voucher(domain, b, good[2]))  # third voucher signed by the wrong client
    with pytest.raises(ChainError) as info:
        chain.settle(parties["submitter"], signed)
    # grouped per client on chain, position 1 is the third voucher of the caller's list
    assert info.value.error_name == "InvalidSignature"
    assert info.value.error_args["voucher"] == 2


def test_settlements_since_decodes_the_batch(chain, parties):
    start = chain.block_number() + 1
    client_key, node = parties["clients"][0], parties["nodes"][1]
    v = voucher(_address(client_key), node, 300, 10**15)
    chain.settle(parties["submitter"], [(v, sign_voucher(chain.eip712_domain(), client_key, v))])
    batches = chain.settlements_since(start)
    assert len(batches) == 1
    assert batches[0]["vouchers"] == [v]
    assert batches[0]["gross"] == 10**15


def test_withdrawal_waits_for_the_unlock_delay(chain, parties):
    client_key = parties["clients"][3]
    client = _address(client_key)
    chain.request_withdrawal(client_key, 10 * ETHER)
    amount, unlock_at = chain.pending_withdrawal(client)
    assert amount == 10 * ETHER
    with pytest.raises(ChainError, match=r"^WithdrawalLocked"):
        chain.withdraw(client_key)
    chain.advance_time(chain.deployment.params["unlock_delay"])
    before_wallet, before_escrow = chain.credit_balance(client), chain.escrow_balance(client)
    chain.withdraw(client_key)
    assert chain.credit_balance(client) == before_wallet + 10 * ETHER
    assert chain.escrow_balance(client) == before_escrow - 10 * ETHER
    with pytest.raises(ChainError, match=r"^NoPendingWithdrawal"):
        chain.withdraw(client_key)


def test_malformed_input_is_refused_before_sending(chain, parties):
    client_key, node = parties["clients"][0], parties["nodes"][0]
    v = voucher(_address(client_key), node, 1, 10**15)
    with pytest.raises(ValueError, match="65-byte"):
        chain.settle(parties["submitter"], [(v, b"\x01" * 64)])
    with pytest.raises(ValueError, match="uint128"):
        chain.settle(parties["submitter"], [({**v, "cumulativeAmount": 2**128}, b"\x01" * 65)])
    with pytest.raises(ValueError, match="at least one"):
        chain.settle(parties["submitter"], [])
