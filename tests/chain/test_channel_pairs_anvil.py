"""Channel pairs on a real Anvil: the wallets one process opens for a key get channels 2k and 2k+1, which share one
storage slot of Settlement, and one wallet's channels to the two nodes of a route share one too; both settle in one
transaction, each keeps its own paid total, and replays are caught per channel."""

from __future__ import annotations

import os

import pytest
from eth_account import Account

from nectar.chain.encoding import encode_settle_batch
from nectar.client.payments import Wallet
from nectar.wire import eip712
from nectar.wire import receipts as wire

ETHER = 10**18
DOMAIN = eip712.make_domain(eip712.DEVNET_CHAIN_ID, eip712.ZERO_ADDRESS)  # for channel ids only


@pytest.fixture(scope="module")
def payer(chain, roles):
    """A fresh client key with 100 credits in escrow, and two wallets of it."""
    deployer = roles["deployer"][0]["privateKey"]
    account = Account.create()
    chain.send_eth(deployer, account.address, 10 * ETHER)
    chain.faucet(account.address, 1_000 * ETHER)
    chain.deposit(account.key.hex(), 100 * ETHER)
    domain = chain.eip712_domain()
    wallets = [Wallet(account.key.hex(), domain=domain) for _ in range(2)]
    return {"key": account.key.hex(), "address": account.address, "wallets": wallets, "domain": domain}


def _signed(payer, node: str, channel_id: int, amount: int, partner: str | None = None):
    v = wire.Voucher(payer["address"], node, channel_id, amount, partner)
    return v, eip712.sign_voucher(v, payer["key"], payer["domain"]).signature


def _settlement_slots(chain, sender: str, signed) -> set[str]:
    """Storage keys of Settlement that ``settle(signed)`` touches, from eth_createAccessList."""
    batch = encode_settle_batch(signed)
    data = chain.settlement.encode_abi("settle", [batch.nodes, batch.groups])
    found = chain.w3.eth.create_access_list({"from": sender, "to": chain.settlement.address, "data": data})
    return {
        key.hex() if isinstance(key, bytes) else key
        for entry in found["accessList"]
        if entry["address"].lower() == chain.settlement.address.lower()
        for key in entry["storageKeys"]
    }


def test_wallets_of_one_key_take_both_channels_of_a_pair(payer):
    first, second = payer["wallets"]
    assert first.channel_id % 2 == 0 and second.channel_id == first.channel_id + 1
    other = Wallet(Account.create().key.hex(), domain=DOMAIN)  # another key draws its own pair
    assert other.channel_id >> 1 != first.channel_id >> 1


def test_forked_child_draws_its_own_pair():
    """A prefork worker must not take the odd half its parent left open (a sibling would take it too)."""
    key = Account.create().key.hex()
    parent = Wallet(key, domain=DOMAIN)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only reports its channel id
        os.write(write, str(Wallet(key, domain=DOMAIN).channel_id).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = int(os.read(read, 64))
    assert child >> 1 != parent.channel_id >> 1
    assert Wallet(key, domain=DOMAIN).channel_id == parent.channel_id + 1  # the parent still fills its own pair


def test_pair_shares_one_slot_and_keeps_two_totals(chain, roles, payer):
    ledger = roles["ledger"][0]["privateKey"]
    sender = Account.from_key(ledger).address
    node = Account.create().address
    lane0, lane1 = (w.channel_id for w in payer["wallets"])
    both = [_signed(payer, node, lane0, 3 * ETHER), _signed(payer, node, lane1, 1 * ETHER)]
    assert _settlement_slots(chain, sender, both) == _settlement_slots(chain, sender, both[:1])
    apart = [both[0], _signed(payer, node, lane0 + 2, 1 * ETHER)]  # the next pair: a slot of its own
    assert len(_settlement_slots(chain, sender, apart)) == len(_settlement_slots(chain, sender, both)) + 1

    chain.settle(ledger, both)
    assert chain.paid(payer["address"], node, lane0) == 3 * ETHER
    assert chain.paid(payer["address"], node, lane1) == 1 * ETHER
    assert chain.escrow_balance(payer["address"]) == 96 * ETHER

    # lane 1 rises past lane 0; lane 0's own last voucher stays a replay, reported at its place in the list
    chain.settle(ledger, [_signed(payer, node, lane1, 5 * ETHER)])
    result = chain.settle(ledger, [_signed(payer, node, lane1, 6 * ETHER), _signed(payer, node, lane0, 3 * ETHER)])
    assert [(s["voucher"], s["reason"]) for s in result.skipped] == [(1, "AlreadySettled")]
    assert chain.paid(payer["address"], node, lane0) == 3 * ETHER
    assert chain.paid(payer["address"], node, lane1) == 6 * ETHER  # the rest of the batch settled
    assert chain.escrow_balance(payer["address"]) == 91 * ETHER  # only lane 1's rise charged


def test_wallet_pairs_the_nodes_of_a_route():
    wallet = Wallet(Account.create().key.hex(), domain=DOMAIN)
    a, b, c, d = (Account.create().address for _ in range(4))
    wallet.pair([a, b, c])
    assert (wallet.partner_of(a), wallet.partner_of(b)) == (b, a)
    assert wallet.partner_of(c) == c  # left alone: pairs with itself from its first voucher on
    wallet.pair([c, d, a])  # c already has its partner (part of its channel), a too: d stays alone
    assert (wallet.partner_of(c), wallet.partner_of(d), wallet.partner_of(a)) == (c, d, b)


def test_route_pair_shares_one_slot_and_pays_each_node(chain, roles, payer):
    ledger = roles["ledger"][0]["privateKey"]
    sender = Account.from_key(ledger).address
    wallet = payer["wallets"][0]
    first, second = Account.create().address, Account.create().address
    wallet.pair([first, second])
    channel = wallet.channel_id + 10  # a fresh id of this key
    route = [
        _signed(payer, first, channel, 2 * ETHER, wallet.partner_of(first)),
        _signed(payer, second, channel, 1 * ETHER, wallet.partner_of(second)),
    ]
    # the second voucher adds the second node's earnings slot only: its channel shares the first one's slot
    assert len(_settlement_slots(chain, sender, route)) == len(_settlement_slots(chain, sender, route[:1])) + 1
    unpaired = [route[0], _signed(payer, second, channel, 1 * ETHER)]  # second's own channel: a slot of its own
    assert len(_settlement_slots(chain, sender, unpaired)) == len(_settlement_slots(chain, sender, route)) + 1

    before = chain.escrow_balance(payer["address"])
    chain.settle(ledger, route)
    assert chain.paid(payer["address"], first, channel, second) == 2 * ETHER
    assert chain.paid(payer["address"], second, channel, first) == 1 * ETHER
    assert chain.paid(payer["address"], second, channel) == 0  # second's own channel of that id is untouched
    assert chain.escrow_balance(payer["address"]) == before - 3 * ETHER
    assert [s["reason"] for s in chain.settle(ledger, route[1:]).skipped] == ["AlreadySettled"]
