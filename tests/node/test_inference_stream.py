"""The node's inference stream state machine (node/inference_stream.py), forward/backward/audit/push RPCs, in memory.

A real ``NodeHandler`` with a real receipt signer, credit ledger, KV-cache budget and audit log, fed requests from
an in-memory ``RequestStream``; the backend and compute thread are fakes that return inputs * 2 at once (or hold a
round until the test starts it). Every test runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
import torch
from eth_account import Account

from nectar.node.audit import AuditLog
from nectar.node.audit_auth import AuditGate
from nectar.node.config import NodeConfig
from nectar.node.handler import NodeHandler
from nectar.node.memory_cache import MemoryCache
from nectar.node.receipts import CreditLedger, ReceiptSigner
from nectar.node.signing import InlineSigning
from nectar.node.steps import NodeSteps
from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as schema
from nectar.wire.messages import (
    AdapterCall,
    AdapterReply,
    AuditCall,
    AuditReply,
    BackwardCall,
    BackwardReply,
    Cancel,
    Flush,
    ForwardCall,
    ForwardReply,
    Open,
    Opened,
    Pay,
    Push,
    PushMissing,
    PushTarget,
    ReceiptMessage,
    Step,
    StepReply,
    decode_inference_reply,
)
from nectar.wire.protocol import ErrorCode, NodeRPCError, unpack_metadata
from nectar.wire.request_stream import RequestStream

MODEL, HIDDEN = "fake-model", 8
UID = f"{MODEL}[0:4]"
DOMAIN = eip712.make_domain(31337, "0x" + "22" * 20)
PRICE = 1  # per token per block


class FakeBackend:
    """Four blocks whose output is the input times two."""

    start, end, hidden_size = 0, 4, HIDDEN

    def cache_bytes_per_token(self, start, end, batch_size=1):
        return 16 * (end - start) * batch_size

    def session_cache_bytes(self, start, end, batch_size, max_length):
        return self.cache_bytes_per_token(start, end, batch_size) * max_length

    def new_caches(self, start, end, batch_size, max_length):
        return [object()]

    def inference_task(self, hidden, caches, *, start, end, position, prompts=None, adapter=None):
        return lambda: hidden * 2

    def forward(self, hidden, *, start, end, prompts=None, keep_graph=True, adapter=None):
        return hidden * 2

    def backward(self, hidden, grad_outputs, *, start, end, prompts=None, adapter=None):
        return grad_outputs * 2, (torch.zeros_like(prompts) if prompts is not None else None)


class FakeCompute:
    """Runs work at once on the caller's loop; with ``hold``, inference rounds wait for ``begin()`` and
    ``finish()``, so a test can see what the node sends while a round computes."""

    def __init__(self):
        self.gathering = False
        self.hold = False
        self.held: list = []
        self.forgotten: list = []  # sessions whose streams ended (the real thread's rounds stop waiting for them)

    def forget(self, session):
        self.forgotten.append(session)

    def submit(self, function, priority, *, started=None):
        future = asyncio.get_running_loop().create_future()
        if self.hold and started is not None:
            self.held.append((function, future, started))
        else:
            self._run(function, future, started)
        return future

    @staticmethod
    def _run(function, future, started):
        if started is not None and not started.done():
            started.set_result(1)  # a round of its own
        try:
            future.set_result(function())
        except Exception as e:
            future.set_exception(e)

    def begin(self):
        """Every held step's round begins: one round of them all."""
        for _, _, started in self.held:
            started.set_result(len(self.held))

    def finish(self):
        held, self.held = self.held, []
        for function, future, started in held:
            self._run(function, future, started)


class _TestClients:
    """The node's trusted clients (``TrustedClients`` in effect): every key these tests made, so its credit limit
    applies to them as to a private swarm's clients; tests of strangers pass ``trusted=TrustedClients()``."""

    def __contains__(self, client: str) -> bool:
        return client in KEYS or client == DEFAULT_CLIENT.address


def make_node(
    memory_bytes: int = 1 << 20, credit_limit: int = 10**9, *, trusted=None, free=None, memory=None, **config
) -> NodeHandler:
    signer = ReceiptSigner(private_key=Account.create().key.hex(), model_id=MODEL, price_per_token=PRICE, domain=DOMAIN)
    config = NodeConfig(**{"session_timeout": 5.0, "receipt_delay": 0.01, **config})
    steps = NodeSteps(
        FakeBackend(),
        config=config,
        model_id=MODEL,
        compute=FakeCompute(),
        memory=memory or MemoryCache(memory_bytes, FakeBackend().cache_bytes_per_token(0, 4)),
        signer=signer,
        credit=CreditLedger(
            node_address=signer.address,
            credit_limit=credit_limit,
            domain=DOMAIN,
            trusted=_TestClients() if trusted is None else trusted,
            free=free,
        ),
        audit=AuditLog(max_bytes=10**6, retention_s=60),
    )
    return NodeHandler(steps, audit_gate=AuditGate(node_address=signer.address, fixed=[VERIFIER.address]))


VERIFIER = Account.create()  # the one key make_node's nodes answer audits to
KEYS: dict[str, bytes] = {}  # client address -> its key: requests are signed with the key of the client they name
DEFAULT_CLIENT = Account.create()  # signs requests that name no client


def new_client():
    account = Account.create()
    KEYS[account.address] = account.key
    return account


def by_client(node: NodeHandler, message):
    """An open or forward/backward call signed by the key of the client it names (issue 22: nodes serve only
    signed ones), for ``node`` (in-process calls carry no peer id)."""
    if not isinstance(message, (Open, ForwardCall, BackwardCall)) or message.auth is not None:
        return message
    key = KEYS.get(message.client, DEFAULT_CLIENT.key)
    return message.signed(key, node=node.steps.signer.address, peer_id="")


def audit_call(node: NodeHandler, session: bytes, step: int, key=None, **kwargs) -> AuditCall:
    """An audit call signed (by the verifier unless ``key``) for ``node`` (in-process calls carry no peer id)."""
    key = VERIFIER.key if key is None else key
    return AuditCall(UID, session, step).signed(key, node=node.steps.signer.address, peer_id="", **kwargs)


END = "end of stream"


class Conversation:
    """One inference stream to ``node``: ``send`` requests, ``receive`` decoded replies (or the error raised)."""

    def __init__(self, node: NodeHandler):
        self.node, self.requests, self.replies = node, RequestStream(), asyncio.Queue()
        self.task = asyncio.ensure_future(self._serve())

    async def _serve(self):
        try:
            async for response in self.node.rpc_inference(self.requests, None):
                await self.replies.put(decode_inference_reply(response))
        except Exception as e:  # the stream's error (a NodeRPCError, or what broke the node)
            await self.replies.put(e)
        await self.replies.put(END)

    async def send(self, message, uid: str = UID):
        message = by_client(self.node, message)
        await self.requests.put(message.to_request() if isinstance(message, Open) else message.to_request(uid))

    async def end(self):
        await self.requests.put(None)

    async def receive(self, timeout: float = 2.0):
        return await asyncio.wait_for(self.replies.get(), timeout)

    def nothing_yet(self) -> bool:
        return self.replies.empty()

    async def error(self) -> NodeRPCError:
        reply = await self.receive()
        assert isinstance(reply, NodeRPCError), reply
        assert await self.receive() == END
        return reply


def run(scenario, timeout: float = 10.0):
    async def bounded():
        return await asyncio.wait_for(scenario(), timeout)

    return asyncio.run(bounded())


def hidden(tokens: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, HIDDEN)


def session_id() -> bytes:
    return os.urandom(16)


def check_receipt(
    node: NodeHandler, receipt: dict, inputs: torch.Tensor, output: torch.Tensor, step: int, session: bytes = b""
) -> schema.SignedReceipt:
    signed = schema.SignedReceipt.from_json(receipt)
    if session:
        assert signed.receipt.session_id == session
    assert eip712.recover_receipt_signer(signed, DOMAIN) == node.steps.signer.address
    assert signed.receipt.step == step
    assert signed.receipt.input_commitment == fingerprints.commit_tensor(inputs)
    assert signed.receipt.output_commitment == fingerprints.commit_tensor(output)
    return signed


def assert_released(node: NodeHandler):
    assert node.active_sessions == 0 and node.memory.used_bytes == 0 and not node.inbox._sessions


# ---- the inference stream -----------------------------------------------------------------------------------------


def test_open_without_a_step_is_acked_and_the_end_releases_everything():
    node = make_node()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, session_id(), max_length=8, push_token=os.urandom(16)))
        opened = await talk.receive()
        assert isinstance(opened, Opened) and opened.cache_tokens_left == node.memory.tokens_left
        assert node.active_sessions == 1 and node.memory.used_bytes == 16 * 4 * 8
        await talk.end()
        assert await talk.receive() == END

    run(scenario)
    assert_released(node)
    assert len(node.steps.compute.forgotten) == 1  # rounds stop waiting for the session that ended


def test_inline_receipts_ride_with_each_output_and_charge_the_client():
    node, client = make_node(), new_client().address
    sid = session_id()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, client=client))
        opened = await talk.receive()
        assert isinstance(opened, Opened) and len(opened.session_nonce) == 32
        for step, tokens in enumerate((3, 1)):
            x = hidden(tokens)
            await talk.send(Step(sid, step, position=3 * step, hidden=x))
            reply = await talk.receive()
            assert isinstance(reply, StepReply) and not reply.receipt_follows
            assert torch.equal(reply.output, x * 2) and reply.fingerprint is not None
            check_receipt(node, reply.receipt, x, reply.output, step, schema.bind_session(sid, opened.session_nonce))
        await talk.end()
        assert await talk.receive() == END
        return opened.session_nonce

    nonce = run(scenario)
    assert node.steps.credit.unpaid(client) == 4 * 4 * PRICE  # 4 tokens through 4 blocks
    history, span, _, _ = node.steps.audit.history(schema.bind_session(sid, nonce), 1)
    assert span == (0, 4) and history.shape == (1, 4, HIDDEN)
    assert_released(node)


def test_an_open_may_carry_the_first_step():
    node = make_node()

    async def scenario():
        talk = Conversation(node)
        sid, x = session_id(), hidden(2)
        await talk.send(Open(UID, sid, max_length=8, first_step=Step(sid, 0, hidden=x)))
        reply = await talk.receive()
        assert isinstance(reply, StepReply) and torch.equal(reply.output, x * 2)
        await talk.end()
        assert await talk.receive() == END

    run(scenario)


@pytest.mark.parametrize("sessions", [1, 2])
def test_a_riding_receipt_comes_in_the_next_answer_where_the_round_serves_other_sessions_too(sessions):
    """With riding receipts ("receipts": "next"), the last step's receipt is signed once the next step's round has
    begun and goes out in that step's answer when the round has other sessions' steps (one message a step instead of
    two, on a loop that bounds such a node), and alone, as soon as it is signed, when the session has the round to
    itself (the loop is free then, and the client checks it before the answer comes)."""
    node = make_node(receipt_delay=10.0)
    ids = [session_id() for _ in range(sessions)]
    inputs = {sid: (hidden(3), hidden(1)) for sid in ids}

    async def scenario():
        talks = {sid: Conversation(node) for sid in ids}
        firsts, nonces = {}, {}
        for sid, talk in talks.items():
            await talk.send(Open(UID, sid, max_length=8, separate_receipts=True, receipts_ride=True))
            nonces[sid] = (await talk.receive()).session_nonce
            await talk.send(Step(sid, 0, position=0, hidden=inputs[sid][0]))
            firsts[sid] = await talk.receive()
            assert firsts[sid].receipt_follows
        node.steps.compute.hold = True
        for sid, talk in talks.items():
            await talk.send(Step(sid, 1, hidden=inputs[sid][1]))
        await asyncio.sleep(0.05)
        node.steps.compute.begin()
        await asyncio.sleep(0.05)
        for sid, talk in talks.items():
            if sessions == 1:  # alone in its round: the receipt goes out while the round computes
                receipt = await talk.receive()
                assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
            else:
                assert talk.nothing_yet()  # it waits for the answer it rides in
        node.steps.compute.finish()
        for sid, talk in talks.items():
            second = await talk.receive()
            assert isinstance(second, StepReply) and second.receipt_follows
            assert torch.equal(second.output, inputs[sid][1] * 2)
            if sessions == 1:
                assert second.previous is None
            else:
                receipt = second.previous
                assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
            check_receipt(
                node,
                receipt.receipt,
                inputs[sid][0],
                firsts[sid].output,
                0,
                session=schema.bind_session(sid, nonces[sid]),
            )
            await talk.send(Flush(sid))  # the last receipt still comes alone
            last = await talk.receive(timeout=1.0)
            assert isinstance(last, ReceiptMessage) and last.step == 1
            await talk.end()
            assert await talk.receive() == END

    run(scenario)
    assert_released(node)


def test_a_riding_receipt_goes_out_alone_when_the_answer_it_rides_in_fails():
    """The last step's receipt, signed to ride in the next answer, still reaches the client when that step's
    compute fails: the node did that work and is paid for it."""
    node = make_node(receipt_delay=10.0)
    failing, other = session_id(), session_id()
    x0, y0, y1 = hidden(2), hidden(2), hidden(1)
    compute = node.steps.backend.inference_task

    def inference_task(hidden_states, caches, **kwargs):
        if not hidden_states.any():  # the failing session's second step

            def fail():
                raise RuntimeError("the device failed")

            return fail
        return compute(hidden_states, caches, **kwargs)

    node.steps.backend.inference_task = inference_task

    async def scenario():
        talks, firsts, nonces = {}, {}, {}
        for sid, x in ((failing, x0), (other, y0)):
            talks[sid] = talk = Conversation(node)
            await talk.send(Open(UID, sid, max_length=8, separate_receipts=True, receipts_ride=True))
            nonces[sid] = (await talk.receive()).session_nonce
            await talk.send(Step(sid, 0, position=0, hidden=x))
            firsts[sid] = await talk.receive()
        node.steps.compute.hold = True
        await talks[failing].send(Step(failing, 1, hidden=torch.zeros(1, 1, HIDDEN)))
        await talks[other].send(Step(other, 1, hidden=y1))
        await asyncio.sleep(0.05)
        node.steps.compute.begin()
        await asyncio.sleep(0.05)
        node.steps.compute.finish()
        receipt = await talks[failing].receive()
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
        check_receipt(
            node, receipt.receipt, x0, firsts[failing].output, 0, session=schema.bind_session(failing, nonces[failing])
        )
        error = await talks[failing].receive()
        assert isinstance(error, RuntimeError) and await talks[failing].receive() == END
        answer = await talks[other].receive()
        assert answer.previous is not None and answer.previous.step == 0 and torch.equal(answer.output, y1 * 2)
        await talks[other].end()

    run(scenario)
    assert node.steps.receipts_riding == 1


def test_a_separate_receipt_is_signed_once_the_next_steps_round_has_begun():
    node = make_node(receipt_delay=10.0)  # never quiet: only the next round (or a flush) brings the receipt
    sid, x0, x1 = session_id(), hidden(3), hidden(1)

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        opened = await talk.receive()
        assert isinstance(opened, Opened)
        await talk.send(Step(sid, 0, position=0, hidden=x0))
        first = await talk.receive()
        assert isinstance(first, StepReply) and first.receipt_follows and first.receipt is None
        node.steps.compute.hold = True
        await talk.send(Step(sid, 1, hidden=x1))  # position omitted: after the cache's 3 tokens
        await asyncio.sleep(0.05)
        assert talk.nothing_yet()  # receipt 0 waits for step 1's round
        node.steps.compute.begin()
        receipt = await talk.receive()
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
        check_receipt(node, receipt.receipt, x0, first.output, 0)
        assert talk.nothing_yet()  # step 1 still computes
        node.steps.compute.finish()
        second = await talk.receive()
        assert isinstance(second, StepReply) and second.receipt_follows and torch.equal(second.output, x1 * 2)
        await talk.send(Flush(sid))  # the client waits for receipt 1: no next step
        receipt = await talk.receive(timeout=1.0)
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 1
        check_receipt(node, receipt.receipt, x1, second.output, 1)
        await talk.end()
        assert await talk.receive() == END
        return opened.session_nonce

    nonce = run(scenario)
    history, _, _, _ = node.steps.audit.history(schema.bind_session(sid, nonce), 1)
    assert torch.equal(history, torch.cat([x0, x1], dim=1))
    assert_released(node)


def test_a_quiet_stream_gets_its_receipt_after_receipt_delay_longer_while_the_compute_thread_gathers():
    node = make_node(receipt_delay=0.02)
    sid = session_id()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        await talk.receive()
        waits = []
        for step, gathering in enumerate((False, True)):
            node.steps.compute.gathering = gathering
            await talk.send(Step(sid, step, hidden=hidden()))
            assert isinstance(await talk.receive(), StepReply)
            began = time.monotonic()
            receipt = await talk.receive()
            waits.append(time.monotonic() - began)
            assert isinstance(receipt, ReceiptMessage) and receipt.step == step
        await talk.end()
        assert await talk.receive() == END
        return waits

    quiet, gathering = run(scenario)
    assert 0.015 < quiet < 0.08  # one receipt_delay
    assert gathering > 0.09  # five receipt_delays: signing now would hold up the round being gathered


def test_the_last_receipt_comes_as_the_client_ends_the_stream():
    node = make_node(receipt_delay=10.0)
    sid = session_id()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        await talk.receive()
        await talk.send(Step(sid, 0, hidden=hidden()))
        await talk.receive()
        await talk.end()
        receipt = await talk.receive(timeout=1.0)
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
        assert await talk.receive() == END

    run(scenario)
    assert_released(node)


class HeldSigning(InlineSigning):
    """The node's own signer, whose signatures wait for ``release()`` (a busy signing process), noting for each
    receipt whether its step's audit record was kept before it was signed."""

    def __init__(self, node: NodeHandler):
        super().__init__(node.steps.signer)
        self.audit, self.gate, self.recorded = node.steps.audit, asyncio.Event(), []

    def prepare(self, **fields):
        pending = super().prepare(**fields)
        sign = pending.result

        async def held():
            self.recorded.append((fields["step"], self.audit.history(fields["session_id"], fields["step"]) is not None))
            await self.gate.wait()
            return await sign()

        pending.result = held
        return pending

    def release(self):
        self.gate.set()


def test_a_step_that_comes_while_a_quiet_receipt_is_signed_computes_meanwhile_and_its_output_follows_that_receipt():
    node = make_node(receipt_delay=0.01)
    signing = node.steps.signing = HeldSigning(node)
    sid, x0, x1 = session_id(), hidden(2), hidden(1)

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        opened = await talk.receive()
        await talk.send(Step(sid, 0, hidden=x0))
        first = await talk.receive()
        assert isinstance(first, StepReply) and first.receipt_follows
        await asyncio.sleep(0.05)  # quiet: receipt 0 is being signed (held)
        assert [step for step, _ in signing.recorded] == [0] and talk.nothing_yet()
        node.steps.compute.hold = True
        await talk.send(Step(sid, 1, hidden=x1))
        await asyncio.sleep(0.02)
        assert len(node.steps.compute.held) == 1  # step 1 went to the compute thread while receipt 0 was signed
        node.steps.compute.begin()
        node.steps.compute.finish()
        await asyncio.sleep(0.02)
        assert talk.nothing_yet()  # step 1's output is ready, but receipt 0 goes first
        signing.release()
        receipt = await talk.receive()
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
        check_receipt(node, receipt.receipt, x0, first.output, 0)
        second = await talk.receive()
        assert isinstance(second, StepReply) and second.receipt_follows and torch.equal(second.output, x1 * 2)
        await talk.send(Flush(sid))
        receipt = await talk.receive()
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 1
        check_receipt(node, receipt.receipt, x1, second.output, 1)
        await talk.end()
        assert await talk.receive() == END
        return opened.session_nonce

    nonce = run(scenario)
    assert signing.recorded == [(0, True), (1, True)]  # each step's audit record was kept before its receipt's signing
    history, _, _, _ = node.steps.audit.history(schema.bind_session(sid, nonce), 1)
    assert torch.equal(history, torch.cat([x0, x1], dim=1))
    assert node.steps.credit.unpaid(DEFAULT_CLIENT.address) == 3 * 4 * PRICE  # both steps charged, once
    assert_released(node)


def test_a_stream_that_ends_while_its_quiet_receipt_is_signed_still_gets_it_first():
    node = make_node(receipt_delay=0.01)
    signing = node.steps.signing = HeldSigning(node)
    sid, x = session_id(), hidden()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        await talk.receive()
        await talk.send(Step(sid, 0, hidden=x))
        output = await talk.receive()
        await asyncio.sleep(0.05)
        await talk.end()
        await asyncio.sleep(0.02)
        assert talk.nothing_yet()
        signing.release()
        receipt = await talk.receive()
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
        check_receipt(node, receipt.receipt, x, output.output, 0)
        assert await talk.receive() == END

    run(scenario)
    assert_released(node)


def test_a_steps_audit_record_is_kept_after_its_output_leaves_and_before_its_separate_receipt_is_signed():
    node = make_node(receipt_delay=10.0)
    signing = node.steps.signing = HeldSigning(node)
    signing.release()
    sid, x = session_id(), hidden()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        bound = schema.bind_session(sid, (await talk.receive()).session_nonce)
        await talk.send(Step(sid, 0, hidden=x))
        assert isinstance(await talk.receive(), StepReply)
        assert node.steps.audit.history(bound, 0) is None  # not on the way of the output
        await talk.send(Flush(sid))
        assert isinstance(await talk.receive(), ReceiptMessage)
        assert node.steps.audit.history(bound, 0) is not None
        await talk.end()
        assert await talk.receive() == END

    run(scenario)
    assert signing.recorded == [(0, True)]


def _voucher(client, node: NodeHandler, amount: int) -> dict:
    voucher = schema.Voucher(
        client=client.address, node=node.steps.signer.address, channel_id=1, cumulative_amount=amount
    )
    return eip712.sign_voucher(voucher, client.key.hex(), DOMAIN).to_json()


def test_pay_settles_the_client_debt():
    node, client = make_node(), new_client()
    sid = session_id()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, client=client.address))
        await talk.receive()
        await talk.send(Step(sid, 0, hidden=hidden(2)))
        await talk.receive()
        assert node.steps.credit.unpaid(client.address) == 2 * 4 * PRICE
        await talk.send(Pay(sid, _voucher(client, node, 2 * 4 * PRICE)))
        await talk.end()
        assert await talk.receive() == END  # a pay gets no answer

    run(scenario)
    assert node.steps.credit.unpaid(client.address) == 0


def test_a_steps_voucher_is_settled_before_its_credit_check_inline_and_once_its_output_is_out_when_separate():
    node, client = make_node(credit_limit=8), new_client()
    sid = session_id()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, client=client.address))
        await talk.receive()
        await talk.send(Step(sid, 0, hidden=hidden(2)))  # 8 credit wei: at the limit
        await talk.receive()
        # inline receipts: the voucher pays for step 0 before step 1's credit check
        await talk.send(Step(sid, 1, hidden=hidden(2), voucher=_voucher(client, node, 8)))
        assert isinstance(await talk.receive(), StepReply)
        await talk.send(Step(sid, 2, hidden=hidden(1)))  # 8 unpaid + 4 > 8
        assert (await talk.error()).code == ErrorCode.CREDIT_LIMIT

        talk = Conversation(node)  # separate receipts: a bad voucher ends the stream after the step's output
        other = session_id()
        await talk.send(Open(UID, other, max_length=8, client=new_client().address, separate_receipts=True))
        await talk.receive()
        await talk.send(Step(other, 0, hidden=hidden(1), voucher={"not": "a voucher"}))
        assert isinstance(await talk.receive(), StepReply)
        error = await talk.error()
        assert error.code == ErrorCode.BAD_REQUEST and "malformed voucher" in str(error)

    run(scenario)
    assert_released(node)


def _forged(client, node: NodeHandler, amount: int) -> dict:
    """A voucher naming ``client`` but signed by another key."""
    voucher = schema.Voucher(
        client=client.address, node=node.steps.signer.address, channel_id=1, cumulative_amount=amount
    )
    return eip712.sign_voucher(voucher, Account.create().key.hex(), DOMAIN).to_json()


def test_a_sessions_vouchers_are_verified_lazily_yet_the_last_one_counts():
    """Each step carries the client's newest voucher; the node recovers a signer once per interval (or when credit
    needs it), not once a step, and the session's last voucher still pays when it ends."""
    node, client = make_node(voucher_check_interval=60.0), new_client()
    sid = session_id()
    kept = []
    original = node.steps.session_vouchers
    node.steps.session_vouchers = lambda c: kept.append(original(c)) or kept[-1]

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=40, client=client.address))
        await talk.receive()
        for step in range(30):  # each step costs 4 (1 token x 4 blocks) and pays what the last ones cost
            voucher = _voucher(client, node, 4 * step) if step else None
            await talk.send(Step(sid, step, hidden=hidden(1), voucher=voucher))
            assert isinstance(await talk.receive(), StepReply)
        assert node.steps.credit.unpaid(client.address) == 4 * 30  # 29 vouchers came, none checked yet
        await talk.send(Step(sid, 30, hidden=hidden(1), voucher=_voucher(client, node, 4 * 30)))
        await talk.receive()
        await talk.end()
        assert await talk.receive() == END

    run(scenario)
    assert kept[0].verified == 1  # the last, at the session's end: 30 came
    assert node.steps.vouchers == {}  # forgotten with the client's last session
    assert node.steps.credit.unpaid(client.address) == 4  # only step 30 is unpaid: its voucher comes next


def test_a_voucher_that_came_in_one_session_pays_for_the_clients_other_sessions():
    """The unchecked vouchers are the client's, not a session's: one session's step that needs credit has the voucher
    another session carried checked (as when every voucher was checked on arrival)."""
    node, client = make_node(credit_limit=12, voucher_check_interval=60.0), new_client()
    a, b = session_id(), session_id()

    async def scenario():
        first, second = Conversation(node), Conversation(node)
        for talk, sid in ((first, a), (second, b)):
            await talk.send(Open(UID, sid, max_length=8, client=client.address))
            await talk.receive()
            await talk.send(Step(sid, 0, hidden=hidden(1)))  # 4 each
            assert isinstance(await talk.receive(), StepReply)
        await first.send(Step(a, 1, hidden=hidden(1), voucher=_voucher(client, node, 8)))  # 8 + 4: no need yet
        assert isinstance(await first.receive(), StepReply)
        assert node.steps.credit.unpaid(client.address) == 12
        await second.send(Step(b, 1, hidden=hidden(1)))  # 12 + 4 > 12: the voucher session a carried pays
        assert isinstance(await second.receive(), StepReply)
        assert node.steps.credit.unpaid(client.address) == 8
        for talk in (first, second):
            await talk.end()

    run(scenario)
    assert_released(node)
    assert node.steps.vouchers == {}


def test_a_voucher_not_yet_verified_grants_no_credit_and_a_forged_one_is_refused_when_needed():
    """Lazy checks must not let a forged voucher buy credit: with a limit of two steps, the third step needs the
    kept voucher, whose signature is checked then, and the step is refused. An honest one pays for the step."""
    node = make_node(credit_limit=8, voucher_check_interval=60.0)

    async def scenario():
        for forged in (True, False):
            sid, client = session_id(), new_client()
            talk = Conversation(node)
            await talk.send(Open(UID, sid, max_length=8, client=client.address))
            await talk.receive()
            for step in range(2):
                await talk.send(Step(sid, step, hidden=hidden(1)))
                assert isinstance(await talk.receive(), StepReply)
            make = _forged if forged else _voucher
            await talk.send(Step(sid, 2, hidden=hidden(1), voucher=make(client, node, 8)))
            if forged:
                error = await talk.error()
                assert error.code == ErrorCode.BAD_REQUEST and "signature" in str(error)
                assert node.steps.credit.unpaid(client.address) == 8  # nothing counted as paid
            else:
                assert isinstance(await talk.receive(), StepReply)
                assert node.steps.credit.unpaid(client.address) == 4  # 8 paid, then step 2's 4
                await talk.end()

    run(scenario)
    assert_released(node)


def test_work_before_a_bad_request_is_still_signed_for():
    node = make_node(receipt_delay=10.0)
    sid, x = session_id(), hidden()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        await talk.receive()
        await talk.send(Step(sid, 0, hidden=x))
        output = await talk.receive()
        await talk.send(Step(sid, 1, hidden=torch.randn(1, 1, HIDDEN + 1)))
        receipt = await talk.receive()
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
        check_receipt(node, receipt.receipt, x, output.output, 0)
        error = await talk.error()
        assert error.code == ErrorCode.BAD_REQUEST and "shape" in str(error)

    run(scenario)
    assert_released(node)


def test_a_step_for_another_session_or_before_any_open_is_unknown():
    node = make_node()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Step(session_id(), 0, hidden=hidden()))
        error = await talk.error()
        assert error.code == ErrorCode.UNKNOWN_SESSION and "open" in str(error)

        talk = Conversation(node)
        await talk.send(Open(UID, b"s1", max_length=8))
        await talk.receive()
        await talk.send(Step(b"s2", 0, position=0, hidden=hidden()))
        assert (await talk.error()).code == ErrorCode.UNKNOWN_SESSION

        talk = Conversation(node)
        await talk.send(Open(UID, b"s1", max_length=8))
        await talk.receive()
        await talk.send(Open(UID, b"s1", max_length=8))  # a second open on one stream
        assert (await talk.error()).code == ErrorCode.UNKNOWN_SESSION

    run(scenario)
    assert_released(node)


def test_an_idle_session_expires_and_frees_its_cache():
    node = make_node(session_timeout=0.05)

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, session_id(), max_length=8))
        await talk.receive()
        error = await talk.error()
        assert error.code == ErrorCode.SESSION_EXPIRED and "replay" in str(error)

    run(scenario)
    assert_released(node)


def test_max_length_position_cache_and_span_limits():
    node = make_node(memory_bytes=16 * 4 * 100)
    sid = session_id()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=4))
        await talk.receive()
        await talk.send(Step(sid, 0, position=0, hidden=hidden(5)))
        error = await talk.error()
        assert error.code == ErrorCode.TOO_LARGE and "max_length" in str(error)

        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=4))
        await talk.receive()
        await talk.send(Step(sid, 0, position=2, hidden=hidden(1)))  # a gap: the cache holds 0 tokens
        error = await talk.error()
        assert error.code == ErrorCode.BAD_REQUEST and "position" in str(error)

        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=101))
        error = await talk.error()
        assert error.code == ErrorCode.CACHE_FULL and "iB" in str(error)

        talk = Conversation(node)
        await talk.send(Open(f"{MODEL}[2:9]", sid, max_length=4))
        assert (await talk.error()).code == ErrorCode.WRONG_SPAN

        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=4, batch_size=2))
        await talk.receive()
        await talk.send(Step(sid, 0, hidden=hidden(1, batch=1)))
        error = await talk.error()
        assert error.code == ErrorCode.BAD_REQUEST and "batch" in str(error)

    run(scenario)
    assert_released(node)


# ---- push ---------------------------------------------------------------------------------------------------------


async def _push(node: NodeHandler, push: Push):
    requests = RequestStream()
    await requests.put(push.to_request())
    await requests.put(None)
    return [unpack_metadata(r.metadata) async for r in node.rpc_push(requests, None)]


def test_a_pushed_step_computes_on_the_pushed_input_and_a_cancelled_one_answers_push_missing():
    node = make_node()
    sid, token, x = session_id(), os.urandom(16), hidden()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, push_token=token))
        await talk.receive()
        await talk.send(Step(sid, 0, pushed=True))
        await asyncio.sleep(0.02)
        assert talk.nothing_yet()  # waits for the push
        assert await _push(node, Push(sid, 0, token, x)) == [{"ok": True}]
        reply = await talk.receive()
        assert isinstance(reply, StepReply) and torch.equal(reply.output, x * 2)

        await talk.send(Step(sid, 1, pushed=True))  # the push never comes: the client cancels and relays
        await talk.send(Cancel(sid, 1))
        assert isinstance(await talk.receive(), PushMissing)
        await talk.send(Step(sid, 2, hidden=x))
        assert isinstance(await talk.receive(), StepReply)
        await talk.send(Cancel(sid, 1))  # a late cancel of a served step is ignored
        await talk.end()
        assert await talk.receive() == END

        with pytest.raises(NodeRPCError) as error:  # the session is gone: nothing accepts its pushes
            await _push(node, Push(sid, 3, token, x))
        assert error.value.code == ErrorCode.UNKNOWN_SESSION

    run(scenario)
    assert_released(node)


def test_push_errors():
    node = make_node()
    sid, token = session_id(), os.urandom(16)

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, push_token=token))
        await talk.receive()
        with pytest.raises(NodeRPCError) as error:
            await _push(node, Push(sid, 0, os.urandom(16), hidden()))
        assert error.value.code == ErrorCode.BAD_REQUEST and "token" in str(error.value)
        with pytest.raises(NodeRPCError) as error:
            await _push(node, Push(sid, 0, token, torch.randn(2, 1, HIDDEN)))  # the session's batch is 1
        assert error.value.code == ErrorCode.BAD_REQUEST
        await talk.send(Step(sid, 0, pushed=True))
        await talk.send(Step(sid, 1, hidden=hidden()))  # not the cancel the waiting step needs
        error = await talk.error()
        assert error.code == ErrorCode.BAD_REQUEST and "cancel" in str(error)

        talk = Conversation(node)  # no push token in the open: a pushed step cannot be served
        await talk.send(Open(UID, sid, max_length=8))
        await talk.receive()
        await talk.send(Step(sid, 0, pushed=True))
        error = await talk.error()
        assert error.code == ErrorCode.BAD_REQUEST and "push_token" in str(error)

    run(scenario)
    assert_released(node)


def test_a_hop_pushes_its_output_to_the_next_hops_direct_lane():
    from nectar.wire.direct import DirectServer

    first, second = make_node(), make_node()
    sid, token, x = session_id(), os.urandom(16), hidden()

    async def scenario():
        server = DirectServer(second.handlers(), local_id="second")
        port = await server.start("127.0.0.1")
        try:
            to_second = Conversation(second)
            await to_second.send(Open(UID, sid, max_length=8, push_token=token))
            await to_second.receive()
            await to_second.send(Step(sid, 0, pushed=True))
            to_first = Conversation(first)
            await to_first.send(Open(UID, sid, max_length=8))
            await to_first.receive()
            target = PushTarget(f"127.0.0.1:{port}", token)
            await to_first.send(Step(sid, 0, hidden=x, push_to=target))
            assert torch.equal((await to_first.receive()).output, x * 2)
            assert torch.equal((await to_second.receive()).output, x * 4)
            assert first.pushes_sent == 1 and second.inbox.received == 1
            await to_first.end()
            await to_second.end()
            assert await to_first.receive() == END and await to_second.receive() == END
        finally:
            await server.close()

    run(scenario)
    assert_released(first)
    assert_released(second)


# ---- forward, backward, audit -------------------------------------------------------------------------------------


async def _call(rpc, request):
    requests = RequestStream()
    await requests.put(request)
    await requests.put(None)
    return [response async for response in rpc(requests, None)]


def test_forward_backward_and_audit_calls():
    node, client = make_node(), new_client().address
    x, grad = hidden(3), hidden(3)

    async def scenario():
        (response,) = await _call(
            node.rpc_forward, by_client(node, ForwardCall(UID, x, client=client, step=5)).to_request()
        )
        reply = ForwardReply.decode(response)
        assert torch.equal(reply.output, x * 2)
        signed = schema.SignedReceipt.from_json(reply.receipt)
        assert signed.receipt.kind == int(schema.ReceiptKind.FORWARD) and signed.receipt.step == 5
        assert signed.receipt.session_id != bytes(32)  # a call without a session gets a fresh one
        # a forward is audited like an inference step: the node kept its input and its output as sent
        (response,) = await _call(node.rpc_audit, audit_call(node, signed.receipt.session_id, 5).to_request())
        kept = AuditReply.decode(response)
        assert torch.equal(kept.inputs, x) and torch.equal(kept.outputs, reply.output)
        assert fingerprints.commit_tensor(kept.outputs) == signed.receipt.output_commitment

        (response,) = await _call(
            node.rpc_backward, by_client(node, BackwardCall(UID, x, grad, client=client)).to_request()
        )
        reply = BackwardReply.decode(response)
        assert torch.equal(reply.grad_inputs, grad * 2) and reply.grad_prompts is None
        with pytest.raises(NodeRPCError, match="grad_outputs"):
            await _call(node.rpc_backward, by_client(node, BackwardCall(UID, x, hidden(4))).to_request())

        sid = session_id()
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, first_step=Step(sid, 0, hidden=x)))
        first = await talk.receive()
        await talk.end()
        await talk.receive()
        bound = schema.bind_session(sid, first.session_nonce)  # audits name the session id receipts carry
        assert schema.SignedReceipt.from_json(first.receipt).receipt.session_id == bound
        (response,) = await _call(node.rpc_audit, audit_call(node, bound, 0).to_request())
        audit = AuditReply.decode(response)
        assert torch.equal(audit.inputs, x) and (audit.start, audit.end) == (0, 4) and audit.prompts is None
        # the step's whole output, as sent: it hashes to what the receipt committed to (nothing for the node to pick)
        signed_step = schema.SignedReceipt.from_json(first.receipt).receipt
        assert torch.equal(audit.outputs, first.output)
        assert fingerprints.commit_tensor(audit.outputs) == signed_step.output_commitment
        assert fingerprints.ComputeSpec.decode(first.fingerprint) == fingerprints.ComputeSpec("float32", "none", "cpu")
        assert fingerprints.fingerprint_hash(first.fingerprint) == signed_step.fingerprint
        with pytest.raises(NodeRPCError) as error:
            await _call(node.rpc_audit, audit_call(node, bound, 1).to_request())
        assert error.value.code == ErrorCode.UNKNOWN_SESSION

    run(scenario)
    assert node.steps.credit.unpaid(client) == 2 * 3 * 4 * PRICE


def test_audits_are_answered_to_registered_verifiers_only():
    """Audit answers carry a session's inputs (block 0's are the user's prompt, issue 21): unsigned calls, calls
    signed by anyone else, for another node, stale or replayed get FORBIDDEN and no inputs."""
    node = make_node()
    sid, x = session_id(), hidden(2)

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, first_step=Step(sid, 0, hidden=x)))
        first = await talk.receive()
        await talk.end()
        await talk.receive()
        bound = schema.bind_session(sid, first.session_nonce)
        stranger = Account.create().key
        other_node = AuditCall(UID, bound, 0).signed(VERIFIER.key, node=Account.create().address, peer_id="")
        replayed = audit_call(node, bound, 0)
        (response,) = await _call(node.rpc_audit, replayed.to_request())
        assert torch.equal(AuditReply.decode(response).inputs, x)
        refused = {
            "unsigned": (AuditCall(UID, bound, 0), "registered verifiers only"),
            "stranger": (audit_call(node, bound, 0, key=stranger), "not a registered verifier"),
            "other node": (other_node, "not a registered verifier"),
            "stale": (audit_call(node, bound, 0, timestamp=int(time.time()) - 3600), "stale"),
            "replayed": (replayed, "replayed"),
        }
        for name, (call, words) in refused.items():
            with pytest.raises(NodeRPCError) as error:
                await _call(node.rpc_audit, call.to_request())
            assert error.value.code == ErrorCode.FORBIDDEN and words in str(error.value), (name, error.value)
        assert node.audit_gate.refused == len(refused)

    run(scenario)


def test_a_node_hands_its_adapters_files_to_registered_verifiers_only(tmp_path):
    """Issue 21: a step computed with an adapter is audited with the very files its receipt's digest binds, so the
    node hands them over by digest, to the verifiers it answers audits to and no one else."""
    pytest.importorskip("peft")
    from nectar.models import load_span
    from nectar.models.adapters import adapter_digest, load_span_adapters
    from nectar.models.tiny import save_tiny_checkpoint, save_tiny_lora

    path = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=2)
    folder = save_tiny_lora(tmp_path / "style-a", path, seed=3)
    node = make_node()
    node.steps.backend.adapters = load_span_adapters([load_span(path, 0, 2)], [folder])
    digest, address = adapter_digest(folder), node.steps.signer.address

    async def scenario():
        (response,) = await _call(
            node.rpc_adapter, AdapterCall(digest).signed(VERIFIER.key, node=address, peer_id="").to_request()
        )
        reply = AdapterReply.decode(response)
        assert hashlib.sha256(reply.config + reply.weights).digest() == digest
        assert reply.weights == (folder / "adapter_model.safetensors").read_bytes()
        refused = {
            "unsigned": (AdapterCall(digest), ErrorCode.FORBIDDEN),
            "stranger": (
                AdapterCall(digest).signed(Account.create().key, node=address, peer_id=""),
                ErrorCode.FORBIDDEN,
            ),
            "unknown": (
                AdapterCall(bytes(32)).signed(VERIFIER.key, node=address, peer_id=""),
                ErrorCode.UNKNOWN_ADAPTER,
            ),
        }
        for name, (call, code) in refused.items():
            with pytest.raises(NodeRPCError) as error:
                await _call(node.rpc_adapter, call.to_request())
            assert error.value.code == code, (name, error.value)
        # an audit call's signature never passes for an adapter call (their own signing domains)
        audit = audit_call(node, bytes(32), 0)
        forged = AdapterCall(digest, audit.timestamp, audit.nonce, audit.signature)
        with pytest.raises(NodeRPCError, match="not a registered verifier"):
            await _call(node.rpc_adapter, forged.to_request())

    run(scenario)


# ---- one receipt per work key (issue 20) ---------------------------------------------------------------------------


def test_a_step_resent_with_its_input_gets_the_receipt_already_signed_and_anything_else_an_error():
    node, client = make_node(), new_client().address
    sid, x, y = session_id(), hidden(2), hidden(2)

    async def stream(resend: Step, words: str):
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, client=client))
        opened = await talk.receive()
        await talk.send(Step(sid, 0, position=0, hidden=x))
        first = await talk.receive()
        await talk.send(Step(sid, 0, position=0, hidden=x.clone()))  # a retry of the same step
        again = await talk.receive()
        assert again.receipt == first.receipt and again.fingerprint == first.fingerprint
        check_receipt(node, again.receipt, x, first.output, 0, schema.bind_session(sid, opened.session_nonce))
        await talk.send(resend)
        error = await talk.error()
        assert error.code == ErrorCode.BAD_REQUEST and words in str(error)

    async def scenario():
        await stream(Step(sid, 0, position=0, hidden=y), "signed already, for another input")
        await stream(Step(sid, 0, position=2, hidden=x), "signed already at position 0, not 2")  # another cache state

    run(scenario)
    assert node.steps.credit.unpaid(client) == 2 * 2 * 4 * PRICE  # each stream's receipt was charged once
    assert len(node.steps.signed_work) == 2
    assert_released(node)


def test_a_step_resent_while_its_separate_receipt_is_unsigned_is_refused_after_that_receipt():
    node = make_node(receipt_delay=10.0)
    sid, x = session_id(), hidden()

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        await talk.receive()
        await talk.send(Step(sid, 0, hidden=x))
        output = await talk.receive()
        await talk.send(Step(sid, 0, position=0, hidden=x))
        receipt = await talk.receive()  # the step's own receipt still goes out, once
        assert isinstance(receipt, ReceiptMessage) and receipt.step == 0
        check_receipt(node, receipt.receipt, x, output.output, 0)
        error = await talk.error()
        assert error.code == ErrorCode.BAD_REQUEST and "is being computed here already" in str(error)

    run(scenario)
    assert_released(node)


def test_two_opens_with_one_session_id_get_two_nonces_and_no_shared_work_key():
    node = make_node()
    sid, x = session_id(), hidden()

    async def once():
        talk = Conversation(node)
        await talk.send(Open(UID, sid, max_length=8, first_step=Step(sid, 0, hidden=x)))
        reply = await talk.receive()
        await talk.end()
        assert await talk.receive() == END
        signed = check_receipt(node, reply.receipt, x, reply.output, 0)
        assert signed.receipt.session_id == schema.bind_session(sid, reply.session_nonce)
        return signed.receipt.session_id

    async def scenario():
        return await once(), await once()

    first, second = run(scenario)
    assert first != second and len(node.steps.signed_work) == 2


def test_each_forward_and_backward_call_gets_a_nonce_of_its_own():
    node, client = make_node(), new_client().address
    x, sid = hidden(2), session_id()

    async def scenario():
        sessions = set()
        for _ in range(2):
            call = ForwardCall(UID, x, client=client, session_id=sid, step=3)
            (response,) = await _call(node.rpc_forward, by_client(node, call).to_request())
            reply = ForwardReply.decode(response)
            signed = check_receipt(node, reply.receipt, x, reply.output, 3)
            assert signed.receipt.session_id == schema.bind_session(sid, reply.session_nonce)
            sessions.add(signed.receipt.session_id)
        call = BackwardCall(UID, x, x, client=client, session_id=sid, step=3)
        (response,) = await _call(node.rpc_backward, by_client(node, call).to_request())
        reply = BackwardReply.decode(response)
        signed = schema.SignedReceipt.from_json(reply.receipt)
        assert signed.receipt.session_id == schema.bind_session(sid, reply.session_nonce)
        sessions.add(signed.receipt.session_id)
        return sessions

    assert len(run(scenario)) == 3
    assert len(node.steps.signed_work) == 3


def test_a_full_audit_log_refuses_new_sessions_and_keeps_every_record():
    """Issue 21: an audit the node cannot answer fails, so a node whose audit budget is full refuses new sessions
    and forward calls (cache_full: the client tries another node) and drops no record before its retention;
    a session already open goes on. Before, the log evicted the oldest sessions, and their audits failed."""
    node, client = make_node(), new_client().address
    node.steps.audit = AuditLog(max_bytes=8000, retention_s=60)

    async def serve_one(talk: Conversation, sid: bytes, step: int, x: torch.Tensor):
        await talk.send(Step(sid, step, hidden=x))
        reply = await talk.receive()
        assert isinstance(reply, StepReply), reply
        return reply

    async def scenario():
        kept, refused = [], None
        held = Conversation(node)  # opened while there is room
        held_sid = session_id()
        await held.send(Open(UID, held_sid, max_length=64, client=client))
        held_nonce = (await held.receive()).session_nonce
        await serve_one(held, held_sid, 0, hidden(4))
        for _ in range(50):
            talk, sid, x = Conversation(node), session_id(), hidden(4)
            await talk.send(Open(UID, sid, max_length=8, client=client))
            opened = await talk.receive()
            if isinstance(opened, NodeRPCError):
                refused = opened
                break
            reply = await serve_one(talk, sid, 0, x)
            kept.append((schema.bind_session(sid, opened.session_nonce), x, reply.output))
            await talk.end()
        assert refused is not None, "the audit log took 50 sessions in 8000 bytes: it evicted records"
        assert refused.code == ErrorCode.CACHE_FULL and "audit storage full" in str(refused)
        with pytest.raises(NodeRPCError) as error:
            await _call(
                node.rpc_forward, by_client(node, ForwardCall(UID, hidden(2), client=client, step=0)).to_request()
            )
        assert error.value.code == ErrorCode.CACHE_FULL
        await serve_one(held, held_sid, 1, hidden(1))  # the open session goes on
        for bound, x, output in kept:
            (response,) = await _call(node.rpc_audit, audit_call(node, bound, 0).to_request())
            answer = AuditReply.decode(response)
            assert torch.equal(answer.inputs, x) and torch.equal(answer.outputs, output)
        history, _, _, _ = node.steps.audit.history(schema.bind_session(held_sid, held_nonce), 1)
        assert history.shape == (1, 5, HIDDEN)
        await held.end()
        return kept

    assert len(run(scenario)) >= 2


# ---- authenticated clients, backed credit, held caches (issue 22) -------------------------------------------------


def test_opens_and_calls_are_billed_to_their_signer_only():
    """Unsigned, mis-addressed (another node), stale, replayed or victim-naming requests are refused, and nothing is
    charged to anyone for them."""
    node, attacker, victim = make_node(), new_client(), new_client()
    here = node.steps.signer.address

    async def opened_or_error(opening: Open):
        talk = Conversation(node)
        await talk.requests.put(opening.to_request())  # as it is: ``send`` would sign an unsigned one
        reply = await talk.receive()
        await talk.end()
        return reply

    async def scenario():
        refusals = {
            "unsigned": Open(UID, session_id(), max_length=8, client=victim.address),
            "victim's name, attacker's key": Open(UID, session_id(), max_length=8, client=victim.address).signed(
                attacker.key, node=here, peer_id=""
            ),
            "for another node": Open(UID, session_id(), max_length=8).signed(
                victim.key, node=Account.create().address, peer_id=""
            ),
            "for another peer id": Open(UID, session_id(), max_length=8).signed(victim.key, node=here, peer_id="Qm"),
            "stale": Open(UID, session_id(), max_length=8).signed(victim.key, node=here, peer_id="", timestamp=1),
        }
        claimed = refusals["victim's name, attacker's key"]
        refusals["victim's name, attacker's key"] = Open(  # the attacker's signature under the victim's name
            claimed.uid, claimed.session_id, 8, 1, victim.address, auth=claimed.auth
        )
        for why, opening in refusals.items():
            reply = await opened_or_error(opening)
            assert isinstance(reply, NodeRPCError) and reply.code == ErrorCode.FORBIDDEN, (why, reply)
        fine = Open(UID, session_id(), max_length=8).signed(victim.key, node=here, peer_id="")
        assert isinstance(await opened_or_error(fine), Opened)
        replayed = await opened_or_error(fine)
        assert isinstance(replayed, NodeRPCError) and "replayed" in str(replayed)
        with pytest.raises(NodeRPCError, match="unsigned"):
            await _call(node.rpc_forward, ForwardCall(UID, hidden(2), client=victim.address).to_request())
        call = ForwardCall(UID, hidden(2), client=victim.address).signed(attacker.key, node=here, peer_id="")
        (response,) = await _call(node.rpc_forward, call.to_request())  # signed: billed to its signer
        assert schema.SignedReceipt.from_json(ForwardReply.decode(response).receipt).receipt.client == attacker.address

    run(scenario)
    assert node.steps.credit.unpaid(victim.address) == 0 and node.steps.credit.unpaid(attacker.address) > 0
    assert node.steps.gate.refused == 7


def test_a_session_idle_of_paid_steps_expires_whatever_it_flushes():
    """Before, each flush (or pay) restarted the idle timer, so a session could hold its cache for ever."""
    node = make_node(session_timeout=0.5)

    async def scenario():
        talk, sid = Conversation(node), session_id()
        await talk.send(Open(UID, sid, max_length=8, separate_receipts=True))
        await talk.receive()
        await talk.send(Step(sid, 0, hidden=hidden(1)))
        assert isinstance(await talk.receive(), StepReply)
        assert isinstance(await talk.receive(), ReceiptMessage)
        began = time.monotonic()
        for _ in range(12):  # a flush every 0.1 s, for longer than the timeout
            if talk.replies.qsize():
                break
            await talk.send(Flush(sid))
            await asyncio.sleep(0.1)
        error = await talk.error()
        assert error.code == ErrorCode.SESSION_EXPIRED and time.monotonic() - began < 1.0

    run(scenario)
    assert_released(node)


def test_one_client_holds_at_most_its_share_and_session_count():
    node = make_node(memory_bytes=16 * 4 * 100)  # 100 tokens
    node.steps.memory = MemoryCache(16 * 4 * 100, 16 * 4, client_share=0.5, client_sessions=2)
    hog, honest = new_client(), new_client()

    async def scenario():
        held = []
        for size, expect in ((30, Opened), (30, NodeRPCError), (10, Opened), (5, NodeRPCError)):
            talk = Conversation(node)
            await talk.send(Open(UID, session_id(), max_length=size, client=hog.address))
            reply = await talk.receive()
            assert isinstance(reply, expect), (size, reply)
            if expect is NodeRPCError:
                assert reply.code == ErrorCode.CACHE_FULL and f"client {hog.address}" in str(reply)
            held.append(talk)
        talk = Conversation(node)  # another client still gets room
        await talk.send(Open(UID, session_id(), max_length=50, client=honest.address))
        assert isinstance(await talk.receive(), Opened)
        talk2 = Conversation(node)
        await talk2.send(Open(UID, session_id(), max_length=50, client=new_client().address))
        busy = await talk2.receive()
        assert busy.code == ErrorCode.CACHE_FULL and "node busy" in str(busy)
        for t in (*held, talk):
            await t.end()
        await asyncio.sleep(0.05)

    run(scenario)


def test_clients_without_escrow_share_a_small_cache_and_give_way_to_trusted_ones():
    """Issue 22: every fresh address got its own cache share, so sessions opened under throwaway keys could hold
    the whole cache. Now clients on the free allowance hold at most their share all together, and a trusted client
    that finds the cache full ends the oldest of their sessions (which hears why)."""
    from nectar.node.receipts import FreeAllowance, TrustedClients

    honest = new_client()
    memory = MemoryCache(16 * 4 * 100, 16 * 4, unbacked_share=0.2, client_sessions=3)  # 100 tokens, 20 unbacked
    node = make_node(memory=memory, trusted=TrustedClients([honest.address]), free=FreeAllowance(10**6))

    async def open_(client, size):
        talk = Conversation(node)
        await talk.send(Open(UID, session_id(), max_length=size, client=client.address))
        return talk, await talk.receive()

    async def scenario():
        strangers = []
        for _ in range(2):
            talk, reply = await open_(new_client(), 10)  # a fresh key each time
            assert isinstance(reply, Opened), reply
            strangers.append(talk)
        _, refused = await open_(new_client(), 10)
        assert refused.code == ErrorCode.CACHE_FULL and "all of them together" in str(refused)
        held = []
        for _ in range(2):  # 80 tokens: the cache is full
            talk, reply = await open_(honest, 40)
            assert isinstance(reply, Opened), reply
            held.append(talk)
        talk, reply = await open_(honest, 10)  # the oldest stranger's session makes room
        assert isinstance(reply, Opened), reply
        held.append(talk)
        evicted = await strangers[0].error()
        assert evicted.code == ErrorCode.CACHE_FULL and "free allowance" in str(evicted)
        assert strangers[1].nothing_yet() and memory.evicted == 1
        _, busy = await open_(honest, 20)  # only unbacked sessions give way: 10 more is all there is
        assert busy.code == ErrorCode.CACHE_FULL
        for t in (*held, strangers[1]):
            await t.end()
        await asyncio.sleep(0.05)

    run(scenario)
    assert_released(node)


def test_strangers_get_no_session_without_escrow_trust_or_free_allowance():
    from nectar.node.receipts import TrustedClients

    node = make_node(trusted=TrustedClients())

    async def scenario():
        talk = Conversation(node)
        await talk.send(Open(UID, session_id(), max_length=8, client=new_client().address))
        error = await talk.error()
        assert error.code == ErrorCode.CREDIT_LIMIT and "--trusted-clients" in str(error)

    run(scenario)
    assert_released(node)


class _Backing:
    """A BackingCache over a dict: client -> wei the chain backs at this node."""

    def __init__(self, values: dict):
        from nectar.node.receipts import BackingCache

        self.values = values
        self.cache = BackingCache(lambda client: values.get(client, 0), min_interval=0)


def test_credit_goes_only_to_checked_escrow_and_rotation_gets_only_the_shared_allowance():
    """Issue 22: a client nothing backs got the node's whole credit limit, and every fresh address as much again.
    Now an unbacked client gets nothing of its own; a node may give a free allowance, shared by all of them."""
    from nectar.node.receipts import FreeAllowance

    backed_client = new_client().address
    backing = _Backing({backed_client: 10})
    credit = CreditLedger(node_address=Account.create().address, credit_limit=4, domain=DOMAIN, backing=backing.cache)

    def served(client: str, steps: int, *, pay: bool = False) -> int:
        done = 0
        for _ in range(steps):
            try:
                credit.check_credit(client, 1)
            except NodeRPCError as e:
                assert e.code == ErrorCode.CREDIT_LIMIT
                break
            credit.charge(client, 1)
            done += 1
        return done

    assert [served(new_client().address, 5) for _ in range(5)] == [0] * 5  # rotation: nothing
    with pytest.raises(NodeRPCError, match="nectar escrow reserve"):
        credit.check_credit(new_client().address, 1)
    # a backed client is served on credit up to the limit while its vouchers lag, and never beyond its escrow
    assert served(backed_client, 20) == 4
    credit._paid[(backed_client, backed_client, 0)] = 4  # its voucher came
    assert served(backed_client, 20) == 4
    credit._paid[(backed_client, backed_client, 0)] = 8
    assert served(backed_client, 20) == 2  # the escrow (10) is spent
    credit._paid[(backed_client, backed_client, 0)] = 10
    assert served(backed_client, 20) == 0
    with pytest.raises(NodeRPCError, match="payment required"):
        credit.check_credit(backed_client, 1, opening=True)  # and it cannot open a session either

    # a free allowance of 6 wei an hour: shared by every unbacked address, so 100 addresses get 6 in all
    free = CreditLedger(
        node_address=Account.create().address,
        credit_limit=4,
        domain=DOMAIN,
        backing=_Backing({}).cache,
        free=FreeAllowance(6),
    )
    credit = free
    assert sum(served(new_client().address, 3) for _ in range(100)) == 6


def test_throwaway_addresses_cannot_make_the_node_hammer_its_ledger():
    """Every open from an unknown address asks the ledger for its backing; those asks are rate-limited node-wide
    (addresses are free to make), done off the event loop, and the table is bounded. Backed clients are not limited."""
    from nectar.node.receipts import BackingCache

    asked = []
    cache = BackingCache(lambda client: asked.append(client) or (5 if client == "backed" else 0), max_entries=50)
    for i in range(200):
        cache.refresh(f"throwaway{i}")
    assert len(asked) <= 21 and cache.skipped >= 179 and len(cache._entries) <= 50
    assert cache.refresh("backed") == 0  # the bucket is empty: not asked now
    cache._tokens = 1.0
    assert cache.refresh("backed") == 5
    cache._entries["backed"] = (0.0, 5)  # stale: a backed client is asked again whatever the bucket holds
    cache._tokens = 0.0
    assert cache.refresh("backed") == 5 and asked[-1] == "backed" and asked.count("backed") == 2
