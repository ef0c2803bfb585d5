"""Fast unit tests of the node's pure parts: block selection, KV-cache budget, credit, audit log, validator."""

from __future__ import annotations

import pytest
import torch
from eth_account import Account

from nectar.node.audit import AuditLog
from nectar.node.block_selection import block_throughputs, choose_best_start, should_move
from nectar.node.memory_cache import MemoryCache
from nectar.node.receipts import ClientVouchers, CreditLedger, FreeAllowance, ReceiptSigner, TrustedClients
from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as schema
from nectar.wire.protocol import ErrorCode, NodeRPCError, parse_module_uid


def test_block_throughputs_and_best_start():
    totals = block_throughputs(6, [(0, 3, 10.0), (2, 4, 5.0)])
    assert totals == [10, 10, 15, 5, 0, 0]
    assert choose_best_start(totals, 2) == 4  # the unserved tail
    assert choose_best_start([5, 5, 5, 5], 2) == 0  # ties: lowest total, then earliest


def test_should_move_only_when_the_swarm_gains_enough():
    # others serve 0:2 well and nothing at 2:4; a node sitting on 0:2 should move to 2:4
    assert should_move([10, 10, 0, 0], current_start=0, length=2, own_throughput=10, balance_quality=0.75) == 2
    # already where it is needed: stay
    assert should_move([10, 10, 0, 0], current_start=2, length=2, own_throughput=10, balance_quality=0.75) is None
    # a small gain is not worth a reload
    assert should_move([10, 10, 9, 9], current_start=0, length=2, own_throughput=1, balance_quality=0.75) is None


def test_memory_cache_reserves_and_refuses_clearly():
    cache = MemoryCache(1000, bytes_per_token=10)
    with cache.reserve(600):
        assert cache.tokens_left == 40
        with pytest.raises(NodeRPCError) as error:
            with cache.reserve(500):
                pass
        assert error.value.code == ErrorCode.CACHE_FULL and "0.5 KiB" in str(error.value)
    assert cache.used_bytes == 0 and cache.tokens_left == 100


def test_credit_ledger_limits_unpaid_work_and_accepts_only_valid_vouchers():
    node, client, stranger = Account.create(), Account.create(), Account.create()
    domain = eip712.make_domain(31337, "0x" + "11" * 20)
    trusted = TrustedClients([client.address])
    credit = CreditLedger(node_address=node.address, credit_limit=100, domain=domain, trusted=trusted)
    credit.charge(client.address, 90)
    credit.check_credit(client.address, 10)
    with pytest.raises(NodeRPCError) as error:
        credit.check_credit(client.address, 11)
    assert error.value.code == ErrorCode.CREDIT_LIMIT and "voucher" in str(error.value)

    def voucher(signer, amount, node_address=node.address, channel=1):
        v = schema.Voucher(client=client.address, node=node_address, channel_id=channel, cumulative_amount=amount)
        return eip712.sign_voucher(v, signer.key.hex(), domain).to_json()

    with pytest.raises(NodeRPCError, match="signature"):
        credit.accept_voucher(voucher(stranger, 90), client.address)  # forged by someone else
    with pytest.raises(NodeRPCError, match="voucher is for node"):
        credit.accept_voucher(voucher(client, 90, node_address=stranger.address), client.address)
    with pytest.raises(NodeRPCError, match="malformed"):
        credit.accept_voucher({"voucher": {"client": "nope"}}, client.address)
    assert credit.accept_voucher(voucher(client, 90), client.address) is not None
    assert credit.accept_voucher(voucher(client, 90), client.address) is None  # replay pays nothing new
    assert credit.unpaid(client.address) == 0
    credit.check_credit(client.address, 100)


def test_a_clients_vouchers_are_checked_once_an_interval_and_count_only_once_checked():
    node, client = Account.create(), Account.create()
    domain = eip712.make_domain(31337, "0x" + "11" * 20)
    trusted = TrustedClients([client.address])
    credit = CreditLedger(node_address=node.address, credit_limit=10**6, domain=domain, trusted=trusted)
    now, accepted = [100.0], []
    vouchers = ClientVouchers(credit, client.address, interval=0.5, accepted=accepted.append, clock=lambda: now[0])

    def voucher(amount, channel=1, signer=client):
        v = schema.Voucher(client=client.address, node=node.address, channel_id=channel, cumulative_amount=amount)
        return eip712.sign_voucher(v, signer.key.hex(), domain).to_json()

    for amount in range(1, 11):
        vouchers.offer(voucher(amount))
    assert vouchers.verified == 0 and credit.vouched(client.address) == 0  # kept, not counted
    vouchers.offer(voucher(3))  # older than the kept one: ignored
    assert [v.voucher.cumulative_amount for v in vouchers.pending.values()] == [10]
    now[0] += 0.5
    vouchers.offer(voucher(11))
    assert vouchers.verified == 1 and credit.vouched(client.address) == 11
    assert accepted[-1].voucher.cumulative_amount == 11
    for channel in (1, 2, 3, 4):  # one kept per channel, at most four channels
        vouchers.offer(voucher(11 + channel, channel=channel))
    assert vouchers.verified == 1 and len(vouchers.pending) == 4
    vouchers.offer(voucher(7, channel=5))  # a fifth: the kept ones are checked first, never dropped
    assert vouchers.verified == 5 and credit.vouched(client.address) == 12 + 13 + 14 + 15
    with pytest.raises(NodeRPCError, match="voucher is for node"):  # its fields are checked as it comes
        v = schema.Voucher(client=client.address, node=client.address, channel_id=1, cumulative_amount=99)
        vouchers.offer(eip712.sign_voucher(v, client.key.hex(), domain).to_json())
    vouchers.sessions = 1
    vouchers.session_ended()
    assert credit.vouched(client.address) == 12 + 13 + 14 + 15 + 7
    vouchers.offer(voucher(40, signer=Account.create()))  # forged: kept, counts for nothing
    with pytest.raises(NodeRPCError, match="signature"):
        vouchers.settle()
    assert credit.vouched(client.address) == 61
    vouchers.offer(voucher(50, signer=Account.create()))
    vouchers.session_ended()  # a session ended: a forged voucher is refused quietly
    assert credit.vouched(client.address) == 61 and not vouchers.pending


def test_without_a_ledger_only_trusted_clients_get_credit_and_strangers_share_the_free_allowance():
    """Issue 22: --trust-vouchers gave every fresh address the whole credit limit. Now only the listed clients get
    it; rotating addresses gets the node-wide free allowance and no more."""
    node, friend = Account.create(), Account.create()
    domain = eip712.make_domain(31337, "0x" + "11" * 20)
    credit = CreditLedger(
        node_address=node.address,
        credit_limit=100,
        domain=domain,
        trusted=TrustedClients.parse(friend.address.lower()),
        free=FreeAllowance(30),
    )

    def served(client: str) -> int:
        done = 0
        while done < 1000:
            try:
                backed = credit.check_credit(client, 10)
            except NodeRPCError as e:
                assert e.code == ErrorCode.CREDIT_LIMIT
                assert ("send a voucher" if client == friend.address else "--trusted-clients") in str(e)
                break
            assert backed == (client == friend.address)
            credit.charge(client, 10)
            done += 1
        return done

    assert sum(served(Account.create().address) for _ in range(20)) == 3  # 30 wei an hour, all strangers together
    assert served(friend.address) == 10  # the credit limit, on vouchers alone
    with pytest.raises(NodeRPCError, match="trusted-clients"):
        credit.check_credit(Account.create().address, 10, opening=True)  # the allowance is spent: no session either
    # free work: strangers' sessions give way to the trusted clients' (where the node names any)
    assert credit.check_credit(friend.address, 0) and not credit.check_credit(Account.create().address, 0)
    open_node = CreditLedger(node_address=node.address, credit_limit=100, domain=domain)
    assert open_node.check_credit(Account.create().address, 0)


def test_trusted_clients_come_from_the_option_and_a_file_reread_when_it_changes(tmp_path, caplog):
    a, b, c = (Account.create().address for _ in range(3))
    path = tmp_path / "clients.txt"
    path.write_text(f"# our lab\n{b}  # alice\n\n")
    trusted = TrustedClients.parse(f"{a}, ", path)
    trusted.recheck = 0
    assert a in trusted and a.lower() in trusted and b in trusted and c not in trusted
    path.write_text(f"{c}\n")
    assert c in trusted and b not in trusted and a in trusted  # reread without a restart
    path.write_text("0xnot-an-address\n")
    assert c in trusted  # a broken file keeps the last good list, and says so
    assert "Keeping the last list" in caplog.text
    with pytest.raises(ValueError, match="not an Ethereum address"):
        TrustedClients.parse("0x1234")
    with pytest.raises(ValueError, match="not an Ethereum address"):
        TrustedClients.parse("", path)  # at start, a broken file stops the node
    assert not TrustedClients.parse("")


def test_receipts_signed_by_the_node_verify_and_chain():
    key = Account.create()
    signer = ReceiptSigner(
        private_key=key.key.hex(), model_id="m", price_per_token=3, domain=eip712.make_domain(31337, "0x" + "22" * 20)
    )
    x, y = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    signed, fingerprint = signer.sign(
        session_id=b"\0" * 32,
        step=0,
        kind=schema.ReceiptKind.INFERENCE,
        start=2,
        end=5,
        client=key.address,
        tokens=2,
        inputs=x,
        outputs=y,
    )
    assert eip712.recover_receipt_signer(signed, signer.domain) == key.address
    receipt = signed.receipt
    assert receipt.price == 9 and receipt.amount == 18
    assert receipt.input_commitment == fingerprints.commit_tensor(
        x
    ) and receipt.output_commitment == fingerprints.commit_tensor(y)
    assert receipt.fingerprint == fingerprints.fingerprint_hash(fingerprint)
    assert fingerprints.ComputeSpec.decode(fingerprint) == fingerprints.ComputeSpec("float32", "none", "cpu")
    # the precision the node computes in is what its receipts commit to: an audit recomputes in it
    half = ReceiptSigner(
        private_key=key.key.hex(),
        model_id="m",
        price_per_token=3,
        domain=signer.domain,
        compute=fingerprints.ComputeSpec.of(torch.bfloat16, "cuda:0"),
    )
    signed_half, descriptor = half.sign(
        session_id=b"\0" * 32,
        step=0,
        kind=schema.ReceiptKind.INFERENCE,
        start=2,
        end=5,
        client=key.address,
        tokens=2,
        inputs=x,
        outputs=y.to(torch.bfloat16),
    )
    assert fingerprints.ComputeSpec.decode(descriptor) == fingerprints.ComputeSpec("bfloat16", "none", "cuda")
    assert signed_half.receipt.fingerprint == fingerprints.fingerprint_hash(descriptor) != receipt.fingerprint


def test_audit_log_replays_rollbacks():
    log = AuditLog(max_bytes=10**6, retention_s=60)
    a, b, c, c2 = (torch.full((1, n, 2), float(v)) for v, n in [(1, 3), (2, 1), (3, 1), (4, 2)])
    log.record(b"s", 0, 0, a, 0, 2)
    log.record(b"s", 1, 3, b, 0, 2)
    log.record(b"s", 2, 4, c, 0, 2)
    log.record(b"s", 3, 3, c2, 0, 2, outputs=c2 * 10)  # rolled back to position 3 and replaced
    history, span, prompts, outputs = log.history(b"s", 3)
    assert span == (0, 2) and prompts is None and history[0, :, 0].tolist() == [1, 1, 1, 4, 4]
    assert torch.equal(outputs, c2 * 10) and log.history(b"s", 2)[3] is None  # the step's own output, as recorded
    assert log.history(b"s", 2)[0][0, :, 0].tolist() == [1, 1, 1, 2, 3]
    assert log.history(b"unknown", 0) is None
    log.record(b"p", 0, 0, a, 0, 2, prompts=torch.ones(2, 1, 1, 2))
    assert log.history(b"p", 0)[2].shape == (2, 1, 1, 2)  # deep prompts travel with the audit
    assert log.history(b"p", 0)[0].shape == (1, 3, 2)


def test_module_uid_parsing():
    assert parse_module_uid("smollm2-135m[3:9]") == ("smollm2-135m", 3, 9)
    with pytest.raises(NodeRPCError):
        parse_module_uid("garbage")
