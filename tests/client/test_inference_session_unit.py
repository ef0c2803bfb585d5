"""The inference session's state machine against in-memory nodes: no processes, no sockets, milliseconds a test.

Each fake node speaks the inference stream's protocol (open, steps with receipts that follow, flush, pay, pushes
and cancels) over an in-memory request/response stream, and computes a toy causal model whose output depends on
its KV cache, so a replacement that was not replayed exactly would answer differently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time

import pytest
import torch
from hivemind.p2p import PeerID

from nectar.client import (
    InferenceFailedError,
    InferenceSession,
    PaymentRequiredError,
    ReceiptRejectedError,
    RouteUnavailableError,
    SessionClosedError,
)
from nectar.client.config import ClientConfig
from nectar.client.hop_stream import HopStream
from nectar.client.payments import Wallet
from nectar.client.routing import MissingBlocksError, RemoteSpan
from nectar.node.receipts import ReceiptSigner
from nectar.wire import eip712
from nectar.wire import receipts as schema
from nectar.wire.announce import ServerInfo, ServerState
from nectar.wire.fingerprints import ComputeSpec
from nectar.wire.protocol import ErrorCode, make_response, unpack_metadata, unpack_tensors
from nectar.wire.receipts import keccak256

BLOCKS, HIDDEN, MODEL = 4, 8, "toy"
DOMAIN = eip712.make_domain(31337, "0x" + "42" * 20)


def block(index: int, hidden: torch.Tensor, cache: dict[int, torch.Tensor], position: int) -> torch.Tensor:
    """Block ``index`` of the toy model: each position adds a share of the mean input over the positions so far.
    ``cache`` (position -> input) is updated in place; a step sent again at its position overwrites it, as a KV
    cache would."""
    out = hidden.clone()
    for t in range(hidden.shape[1]):
        cache[position + t] = hidden[:, t].clone()
        total = sum(cache[p] for p in range(position + t + 1))
        out[:, t] += 0.1 * (index + 1) * total / (position + t + 1)
    return out


def run_blocks(chunks: list[torch.Tensor], blocks: range) -> list[torch.Tensor]:
    """The toy model's ``blocks`` run locally, chunk after chunk."""
    caches = {b: {} for b in blocks}
    outputs, position = [], 0
    for x in chunks:
        length = x.shape[1]
        for b in blocks:
            x = block(b, x, caches[b], position)
        outputs.append(x)
        position += length
    return outputs


def reference(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    return run_blocks(chunks, range(BLOCKS))


class Network:
    """The in-memory swarm: nodes by peer id and direct address."""

    def __init__(self):
        self.nodes: dict[PeerID, FakeNode] = {}

    def add(self, node: FakeNode) -> FakeNode:
        self.nodes[node.peer_id] = node
        node.network = self
        return node

    def by_address(self, address: str) -> FakeNode | None:
        return next((n for n in self.nodes.values() if n.info.direct_address == address), None)

    async def connect(self, span: RemoteSpan, requests):
        """The node serves the stream in a task of its own, as a remote one would: it reads requests whether or
        not the client reads replies."""
        node = self.nodes[span.peer_id]
        if node.dead:
            raise ConnectionRefusedError(f"{node.name} is down")
        replies: asyncio.Queue = asyncio.Queue()

        async def serve():
            try:
                async for reply in node.serve(span, requests):
                    replies.put_nowait(reply)
                replies.put_nowait(None)
            except Exception as e:  # the client reads it as the stream's error
                replies.put_nowait(e)

        async def read():
            while (reply := await replies.get()) is not None:
                if isinstance(reply, Exception):
                    raise reply
                yield reply

        node.tasks.append(asyncio.ensure_future(serve()))
        return read()


class FakeNode:
    """A node serving blocks [start, end) of the toy model over in-memory streams.

    :param dies_at: the step number at which its streams break (and it stays down)
    :param dies_after_push_at: the same, once it computed that step and pushed its output to the next hop
    :param bad_receipt_at: step numbers whose receipts commit to another output
    :param unbound_at: step numbers whose receipts name the client's session id, not the one bound to its nonce
    :param binds: False: a node from before session nonces (it sends none and signs the client's session id)
    :param error: an ErrorCode it answers every step with
    :param hangs: it accepts opens and never answers a step (a black hole)
    :param pushes: whether it pushes its outputs to the next hop when asked
    :param forged_at: step number -> the receipt field it signs wrong there: "model" (another model id), "step" (the
        next step's number), "kind" (a forward's receipt), "old" (dated an hour ago)
    :param compute: the compute descriptor its receipts commit to (the one it announces by default)
    :param rides: where the open asks for riding receipts, each step's answer carries the last step's receipt (as a
        node does when the step's round served other sessions too), which then comes in no message of its own
    :param corrupt_at: step number -> what it answers there instead of its output (given the output, returns the
        response)
    """

    count = 0

    def __init__(
        self,
        name: str,
        start: int,
        end: int,
        *,
        dies_at: int | None = None,
        dies_after_push_at: int | None = None,
        bad_receipt_at: tuple[int, ...] = (),
        unbound_at: tuple[int, ...] = (),
        binds: bool = True,
        error: ErrorCode | None = None,
        error_text: str = "",
        hangs: bool = False,
        pushes: bool = True,
        forged_at: dict[int, str] | None = None,
        compute: ComputeSpec | None = None,
        corrupt_at: dict | None = None,
        rides: bool = False,
    ):
        FakeNode.count += 1
        self.rides = rides
        self.lone_receipts = 0  # receipts sent as messages of their own
        self.corrupt_at = corrupt_at or {}
        self.name, self.start, self.end = name, start, end
        self.hangs = hangs
        self.peer_id = PeerID(b"\x00\x24\x08\x01\x12\x20" + bytes([FakeNode.count]) * 32)
        self.key = "0x" + (bytes([FakeNode.count]) * 32).hex()
        self.signer = ReceiptSigner(
            private_key=self.key, model_id=MODEL, price_per_token=1, domain=DOMAIN, compute=compute or ComputeSpec()
        )
        self.info = ServerInfo(
            state=int(ServerState.ONLINE),
            start=start,
            end=end,
            throughput=100,
            inference_rps=100,
            forward_rps=100,
            network_rps=1e9,
            dtype="float32",
            cache_tokens_left=10**6,
            price_per_token=1,
            eth_address=self.signer.address,
            public_name=name,
            direct_address=f"10.0.0.{FakeNode.count}:1",
        )
        self.dies_at, self.dies_after_push_at = dies_at, dies_after_push_at
        self.bad_receipt_at, self.error, self.pushes = bad_receipt_at, error, pushes
        self.error_text = error_text
        self.unbound_at, self.binds = unbound_at, binds
        self.forged_at = forged_at or {}
        self.other_model = ReceiptSigner(private_key=self.key, model_id="other", price_per_token=1, domain=DOMAIN)
        self.dead = False
        self.steps: list[tuple[int, int, torch.Tensor]] = []  # (step, position, input) of every step computed
        self.pushed_steps: list[int] = []  # steps computed on a pushed input
        self.vouchers: list[dict] = []
        self.inbox: dict[bytes, tuple[bytes, dict[int, asyncio.Future]]] = {}  # session -> (push token, pushes)
        self.network: Network | None = None
        self.tasks: list[asyncio.Task] = []

    def _slot(self, session_id: bytes, step: int) -> asyncio.Future:
        return self.inbox[session_id][1].setdefault(step, asyncio.get_running_loop().create_future())

    def deliver(self, session_id: bytes, step: int, token: bytes, hidden: torch.Tensor) -> None:
        if session_id in self.inbox and self.inbox[session_id][0] == token:
            self._slot(session_id, step).set_result(hidden.clone())

    async def serve(self, span: RemoteSpan, requests):
        requests = requests.__aiter__()
        opening = unpack_metadata((await requests.__anext__()).metadata)
        assert opening["type"] == "open" and opening["receipts"] in ("separate", "next")
        rides = self.rides and opening["receipts"] == "next"
        session_id, client = opening["session_id"], opening["client"]
        if "push_token" in opening:
            self.inbox[session_id] = (opening["push_token"], {})
        nonce = os.urandom(32)
        bound = schema.bind_session(session_id, nonce) if self.binds else session_id.rjust(32, b"\0")
        yield make_response([], {"type": "opened", **({"session_nonce": nonce} if self.binds else {})})
        caches = {b: {} for b in range(span.start, span.end)}
        receipt = None  # the last step's receipt, sent before (or in) the next answer or on a flush

        def alone(receipt: dict):
            self.lone_receipts += 1
            return make_response([], {"type": "receipt", **receipt})

        following = asyncio.ensure_future(anext(requests, None))
        while True:
            request = await following
            if request is None:
                if receipt is not None:
                    yield alone(receipt)
                return
            following = asyncio.ensure_future(anext(requests, None))
            metadata = unpack_metadata(request.metadata)
            if metadata["type"] == "flush" and receipt is not None:
                yield alone(receipt)
                receipt = None
            if metadata["type"] == "pay":
                self.vouchers.append(metadata["voucher"])
            if metadata["type"] != "step":
                continue
            step, position = metadata["step"], metadata["position"]
            if self.dead or step == self.dies_at:
                self.dead = True
                raise ConnectionResetError(f"{self.name} died")
            if self.error is not None:
                raise RuntimeError(f"{self.error.value}: {self.error_text or self.name + ' refuses this step'}")
            if self.hangs:
                await asyncio.sleep(3600)
            if metadata.get("pushed"):
                if receipt is not None:
                    yield alone(receipt)
                    receipt = None
                pushed = self._slot(session_id, step)
                await asyncio.wait({pushed, following}, return_when=asyncio.FIRST_COMPLETED)
                if not pushed.done():  # the client spoke first: it must be the cancel of this step
                    cancel = unpack_metadata((await following).metadata)
                    assert (cancel["type"], cancel["step"]) == ("cancel", step)
                    following = asyncio.ensure_future(anext(requests, None))
                    yield make_response([], {"push_missing": True})
                    continue
                hidden = pushed.result()
                self.pushed_steps.append(step)
            else:
                hidden = unpack_tensors(request.tensors)[0]
            self.steps.append((step, position, hidden))
            out = hidden
            for b in range(span.start, span.end):
                out = block(b, out, caches[b], position)
            target = metadata.get("push_to")
            if target is not None and self.pushes:
                self.network.by_address(target["address"]).deliver(session_id, step, target["token"], out)
                if step == self.dies_after_push_at:
                    self.dead = True
                    raise ConnectionResetError(f"{self.name} died")
            answer = {"receipt_follows": True}
            if receipt is not None and rides:
                answer["previous_receipt"] = receipt
            elif receipt is not None:
                yield alone(receipt)
            corrupt = self.corrupt_at.get(step)
            yield corrupt(out) if corrupt else make_response([out], answer)
            committed = out + 1 if step in self.bad_receipt_at else out
            forged = self.forged_at.get(step)
            signed, descriptor = (self.other_model if forged == "model" else self.signer).sign(
                session_id=session_id.rjust(32, b"\0") if step in self.unbound_at else bound,
                step=step + 1 if forged == "step" else step,
                kind=schema.ReceiptKind.FORWARD if forged == "kind" else schema.ReceiptKind.INFERENCE,
                start=span.start,
                end=span.end,
                client=client,
                tokens=hidden.shape[0] * hidden.shape[1],
                inputs=hidden,
                outputs=committed,
            )
            if forged == "old":
                signed = eip712.sign_receipt(
                    dataclasses.replace(signed.receipt, timestamp=signed.receipt.timestamp - 3600), self.key, DOMAIN
                )
            receipt = {"step": step, "receipt": signed.to_json(), "fingerprint": descriptor}


class FakeManager:
    """Routes through the first unbanned node (in the order given) serving each next block."""

    model_id, num_blocks = MODEL, BLOCKS
    active_adapter = None  # the base model

    def __init__(self, network: Network):
        self.network = network
        self.bans: list[tuple[PeerID, str]] = []
        self.ok: set[PeerID] = set()
        self.ban_timeouts: list[float | None] = []

    def make_inference_route(
        self, start: int, end: int, *, cache_tokens: int = 0, exclude: tuple = (), max_price: int | None = None
    ) -> list[RemoteSpan]:  # price caps are the session's to enforce here
        banned = {peer for peer, _ in self.bans} | set(exclude)
        route, at = [], start
        while at < end:
            node = next(
                (n for n in self.network.nodes.values() if n.start <= at < n.end and n.peer_id not in banned), None
            )
            if node is None:
                raise MissingBlocksError(list(range(at, end)), MODEL)
            route.append(RemoteSpan(node.peer_id, at, min(end, node.end), node.info))
            at = min(end, node.end)
        return route

    def ban(self, peer_id: PeerID, reason: str = "", *, timeout: float | None = None) -> None:
        self.bans.append((peer_id, reason))
        self.ban_timeouts.append(timeout)

    def mark_ok(self, peer_id: PeerID) -> None:
        self.ok.add(peer_id)

    def observe(self, peer_id: PeerID, block_tokens: int, seconds: float) -> None:
        pass


class LoopRuntime:
    """The part of ClientRuntime a session uses: an event loop in a thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def runtime():
    runtime = LoopRuntime()
    yield runtime
    runtime.stop()


def _session(
    runtime, network: Network, *, max_length: int = 32, ledger=None, **config
) -> tuple[InferenceSession, FakeManager]:
    manager = FakeManager(network)
    config = ClientConfig(**{"step_timeout": 2.0, "connect_timeout": 2.0, "max_retries": 3, **config})
    session = InferenceSession(
        manager,
        runtime,
        Wallet(domain=DOMAIN, ledger=ledger),
        max_length=max_length,
        config=config,
        streams=lambda span: HopStream(runtime, span, MODEL, connect=network.connect),
    )
    return session, manager


def _chunks(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 5, HIDDEN, generator=generator)] + [
        torch.randn(1, 1, HIDDEN, generator=generator) for _ in range(steps - 1)
    ]


def _generate(session: InferenceSession, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    return [session.step(x) for x in chunks]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _eventually(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _history(node: FakeNode, steps: int | None = None) -> list[tuple[int, int, list]]:
    return [(step, position, x.tolist()) for step, position, x in node.steps[:steps]]


@pytest.mark.parametrize("rides", [False, True])
def test_a_step_runs_through_every_hop_and_each_receipt_is_checked_and_paid(runtime, rides):
    """Receipts come as messages of their own or (``rides``) in the next step's answer, and are paid either way."""
    network = Network()
    first, second = network.add(FakeNode("a", 0, 2, rides=rides)), network.add(FakeNode("b", 2, 4, rides=rides))
    session, manager = _session(runtime, network)
    chunks = _chunks(6)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))
    assert [(s.start, s.end) for s in session.route] == [(0, 2), (2, 4)] and session.failovers == 0
    assert [(step, position) for step, position, _ in second.steps] == [(0, 0)] + [(i, 4 + i) for i in range(1, 6)]
    assert all(torch.equal(x, y) for (_, _, x), y in zip(second.steps, run_blocks(chunks, range(2))))
    assert len(session.wallet.receipts) == 12 and manager.ok == {first.peer_id, second.peer_id}
    # riding, only the last step's receipt came alone (flushed at the close)
    assert [first.lone_receipts, second.lone_receipts] == ([1, 1] if rides else [6, 6])
    # the close pays for everything, the last step included
    for node in (first, second):
        _eventually(lambda node=node: node.vouchers)
        assert int(node.vouchers[-1]["voucher"]["cumulativeAmount"]) == session.wallet.owed(node.info.eth_address) > 0
    with pytest.raises(SessionClosedError, match="closed"):
        session.step(chunks[1])


def test_a_hop_that_dies_is_replaced_and_its_history_replayed_in_the_original_steps(runtime, caplog):
    network = Network()
    network.add(FakeNode("a", 0, 2))
    victim = network.add(FakeNode("b", 2, 4, dies_at=3))
    spare = network.add(FakeNode("spare", 2, 4))
    session, manager = _session(runtime, network)
    chunks = _chunks(7)
    with session, caplog.at_level("INFO", logger="nectar.client.inference_session"):
        outputs = _generate(session, chunks)
    (moved,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Failover")]
    assert len(moved) < 300 and "tensor" not in moved, moved  # it printed every replayed input once
    assert _same(outputs, reference(chunks))  # greedy decoding would pick the same tokens
    assert session.failovers == 1 and [s.peer_id for s in session.route][1] == spare.peer_id
    assert [peer for peer, _ in manager.bans] == [victim.peer_id]
    assert _history(spare, 3) == _history(victim)  # steps 0-2 replayed: same numbers, positions and inputs
    assert [step for step, _, _ in spare.steps] == list(range(7))


def _with(value: float, dtype: torch.dtype = torch.float32, requires_grad: bool = False):
    def corrupt(out: torch.Tensor):
        out = out.clone()
        out[0, -1, 3] = value
        response = make_response([out.to(dtype)], {"receipt_follows": True})
        response.tensors[0].requires_grad = requires_grad  # a flag any node may set on the wire
        return response

    return corrupt


@pytest.mark.parametrize(
    "corrupt",
    [
        _with(float("nan")),
        _with(float("inf")),
        _with(float("-inf"), torch.float16),
        _with(float("nan"), torch.bfloat16),
        _with(float("nan"), requires_grad=True),
    ],
    ids=["nan", "inf", "float16-inf", "bfloat16-nan", "nan-requires-grad"],
)
def test_a_non_finite_output_fails_the_hop_over_before_it_is_used(runtime, corrupt):
    network = Network()
    network.add(FakeNode("a", 0, 2))
    liar = network.add(FakeNode("b", 2, 4, corrupt_at={2: corrupt}))
    spare = network.add(FakeNode("spare", 2, 4))
    session, manager = _session(runtime, network)
    chunks = _chunks(5)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))  # the bad output never reached the caller
    assert session.failovers == 1 and session.route[1].peer_id == spare.peer_id
    assert [peer for peer, _ in manager.bans] == [liar.peer_id] and "malformed output" in manager.bans[0][1]


@pytest.mark.parametrize("rides", [False, True])
def test_a_dishonest_receipt_fails_the_hop_over_and_bans_its_node(runtime, rides):
    """Riding in the next step's answer, a bad receipt fails the hop over before that answer is used."""
    network = Network()
    network.add(FakeNode("a", 0, 2))
    liar = network.add(FakeNode("b", 2, 4, bad_receipt_at=(1,), rides=rides))
    spare = network.add(FakeNode("spare", 2, 4))
    session, manager = _session(runtime, network)
    chunks = _chunks(6)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))
    assert session.failovers == 1 and session.route[1].peer_id == spare.peer_id
    assert [peer for peer, _ in manager.bans] == [liar.peer_id]
    assert "dishonest receipt" in manager.bans[0][1] and "output commitment" in manager.bans[0][1]
    # the liar's step-1 receipt was refused; the spare replayed from step 0 and signed for every step it did
    paid = [(r.receipt.node, r.receipt.step) for r in session.wallet.receipts if r.receipt.block_start == 2]
    assert (liar.info.eth_address, 1) not in paid and [s for n, s in paid if n == spare.info.eth_address] == list(
        range(len(spare.steps))
    )
    assert _history(spare, len(liar.steps)) == _history(liar)  # replayed all it had accepted from the liar


class Submissions:
    """Where a wallet with a ledger puts the receipts it accepts (``LedgerPaymentPolicy.on_receipt``'s signature)."""

    def __init__(self):
        self.items: list[tuple] = []

    def on_receipt(self, signed, fingerprint, countersignature=None) -> None:
        self.items.append((signed, fingerprint, countersignature))


def test_the_client_countersigns_every_receipt_it_accepts_and_none_it_refuses(runtime):
    network = Network()
    network.add(FakeNode("a", 0, 2))
    liar = network.add(FakeNode("b", 2, 4, bad_receipt_at=(1,)))
    network.add(FakeNode("spare", 2, 4))
    submissions = Submissions()
    session, _ = _session(runtime, network, ledger=submissions)
    with session:
        _generate(session, _chunks(6))
    assert [signed for signed, _, _ in submissions.items] == session.wallet.receipts  # each accepted one, once
    for signed, fingerprint, countersignature in submissions.items:
        struct_hash = eip712.receipt_struct_hash(signed.receipt)
        assert eip712.recover_countersigner(struct_hash, countersignature, DOMAIN) == session.wallet.address
        assert fingerprint is not None and keccak256(fingerprint) == signed.receipt.fingerprint  # auditable
    assert (liar.info.eth_address, 1) not in {(s.receipt.node, s.receipt.step) for s, _, _ in submissions.items}


def test_a_receipt_not_bound_to_the_nodes_nonce_fails_the_hop_over(runtime):
    """A receipt must name the session id bound to the nonce its node drew at the open: one naming the client's own
    id could share a work key with another stream's (issue 20)."""
    network = Network()
    network.add(FakeNode("a", 0, 2))
    liar = network.add(FakeNode("b", 2, 4, unbound_at=(2,)))
    spare = network.add(FakeNode("spare", 2, 4))
    session, manager = _session(runtime, network)
    chunks = _chunks(5)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))
    assert session.failovers == 1 and session.route[1].peer_id == spare.peer_id
    assert [peer for peer, _ in manager.bans] == [liar.peer_id] and "names another session" in manager.bans[0][1]
    sessions = {r.receipt.node: r.receipt.session_id for r in session.wallet.receipts if r.receipt.step == 0}
    assert len(set(sessions.values())) == 3  # a session id of its own at every node, the replacement's too


@pytest.mark.parametrize(
    "forged, problem",
    [
        ("model", "names model"),
        ("step", "not the step 2 asked for"),
        ("kind", "not 0 (INFERENCE)"),
        ("old", "backdates"),
    ],
)
def test_a_receipt_for_other_work_fails_the_hop_over_at_once(runtime, forged, problem):
    """A receipt naming another model, step or kind (or backdated) could never be audited against the step the client
    asked for (issue 21: a cheater's way to evade audits): the client refuses it, pays nothing for it, bans the node
    and fails over before its next step."""
    network = Network()
    network.add(FakeNode("a", 0, 2))
    liar = network.add(FakeNode("b", 2, 4, forged_at={2: forged}))
    spare = network.add(FakeNode("spare", 2, 4))
    session, manager = _session(runtime, network)
    chunks = _chunks(5)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))
    assert session.failovers == 1 and session.route[1].peer_id == spare.peer_id
    assert [peer for peer, _ in manager.bans] == [liar.peer_id]
    assert "dishonest receipt" in manager.bans[0][1] and problem in manager.bans[0][1], manager.bans
    paid = [r.receipt.step for r in session.wallet.receipts if r.receipt.node == liar.info.eth_address]
    assert paid == [0, 1]  # nothing for the forged receipt or after it
    # the step after the forged one went to the spare: the liar never computed step 4
    assert [step for step, _, _ in liar.steps] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "claims, why",
    [
        (ComputeSpec("bfloat16"), "commits to bfloat16 computation, the node announced float32"),
        (ComputeSpec("float32", device="cuda"), None),  # the device class is not announced: any one is fine
    ],
)
def test_a_receipt_committing_to_another_precision_than_announced_fails_the_hop_over(runtime, claims, why):
    """Audits recompute in the precision a receipt commits to; the client checks at once that it is the one the
    node announced (and one an audit can recompute), so a node cannot be routed as float32 and audited as bfloat16."""
    network = Network()
    network.add(FakeNode("a", 0, 2))
    node = network.add(FakeNode("b", 2, 4, compute=claims))
    network.add(FakeNode("spare", 2, 4))
    session, manager = _session(runtime, network)
    chunks = _chunks(3)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))
    if why is None:
        assert session.failovers == 0 and not manager.bans
    else:
        assert [peer for peer, _ in manager.bans] == [node.peer_id] and why in manager.bans[0][1]


def test_a_node_from_before_session_nonces_still_serves(runtime):
    network = Network()
    network.add(FakeNode("a", 0, 2, binds=False))
    network.add(FakeNode("b", 2, 4))
    session, _ = _session(runtime, network)
    chunks = _chunks(3)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks)) and session.failovers == 0 and len(session.wallet.receipts) == 6


@pytest.mark.parametrize("rides", [False, True])
def test_push_mode_pushes_and_relays_a_step_whose_push_went_missing(runtime, rides):
    network = Network()
    first = network.add(FakeNode("a", 0, 2, rides=rides))
    second = network.add(FakeNode("b", 2, 4, rides=rides))
    session, _ = _session(runtime, network, push=True, push_timeout=0.05)
    chunks = _chunks(5)
    outputs = _generate(session, chunks[:3])
    assert session.pushed_steps == 3 and second.pushed_steps == [0, 1, 2]
    first.pushes = False  # a firewall between the nodes, say
    outputs += _generate(session, chunks[3:])
    session.close()
    assert _same(outputs, reference(chunks))
    assert session.push_fallbacks == 2 and session.pushed_steps == 3 and session.failovers == 0
    assert [step for step, _, _ in second.steps] == list(range(5))  # the relayed steps kept their numbers
    assert len(session.wallet.receipts) == 10


def test_push_mode_stops_asking_after_push_misses_steps_in_a_row(runtime):
    network = Network()
    network.add(FakeNode("a", 0, 2, pushes=False))
    second = network.add(FakeNode("b", 2, 4))
    session, _ = _session(runtime, network, push=True, push_timeout=0.02, push_misses=2)
    chunks = _chunks(6)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))
    assert session.push_fallbacks == 2 and session.pushed_steps == 0 and second.pushed_steps == []


@pytest.mark.parametrize("pushed_first", [False, True])
def test_a_hop_failing_in_push_mode_fails_over_and_burns_a_step_number_a_later_hop_used(runtime, pushed_first):
    network = Network()
    network.add(FakeNode("a", 0, 1))
    death = {"dies_after_push_at": 2} if pushed_first else {"dies_at": 2}
    victim = network.add(FakeNode("b", 1, 2, **death))
    last = network.add(FakeNode("c", 2, 4))
    spare = network.add(FakeNode("spare", 1, 2))
    session, manager = _session(runtime, network, push=True, push_timeout=0.5)
    chunks = _chunks(5)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))
    assert session.failovers == 1 and [peer for peer, _ in manager.bans] == [victim.peer_id]
    assert _history(spare, 2) == _history(victim)[:2]  # steps 0 and 1 replayed as they were
    if pushed_first:  # c computed step 2 from b's push: its receipt exists, so the retry is step 3 (same position)
        assert [step for step, _, _ in spare.steps] == [0, 1, 3, 4, 5] and session.step_index == 6
        assert [(s, p) for s, p, _ in last.steps] == [(0, 0), (1, 5), (2, 6), (3, 6), (4, 7), (5, 8)]
    else:  # b died before c saw anything: the retry keeps number 2
        assert [step for step, _, _ in spare.steps] == [0, 1, 2, 3, 4] and session.step_index == 5
    assert session.pushed_steps == 4  # every step but the failed one; push resumes on the new route


def test_node_errors_raise_named_errors_once_every_retry_failed(runtime):
    network = Network()
    network.add(FakeNode("a", 0, 4, error=ErrorCode.TOO_LARGE))
    network.add(FakeNode("b", 0, 4, error=ErrorCode.TOO_LARGE))
    session, manager = _session(runtime, network, max_retries=1)
    with pytest.raises(InferenceFailedError, match="too_large") as error:
        session.step(_chunks(1)[0])
    assert error.value.code is ErrorCode.TOO_LARGE and isinstance(error.value, RuntimeError)
    assert len(manager.bans) == 2

    network = Network()
    network.add(FakeNode("a", 0, 4, error=ErrorCode.CREDIT_LIMIT))
    session, _ = _session(runtime, network, max_retries=0)
    with pytest.raises(PaymentRequiredError, match="credit_limit") as error:
        session.step(_chunks(1)[0])
    assert error.value.code is ErrorCode.CREDIT_LIMIT


def test_a_nodes_error_text_is_cut_short_before_it_reaches_logs_bans_and_errors(runtime, caplog):
    """A node chooses its error's text: a megabyte of it must not become a megabyte per log line, ban and API error."""
    network = Network()
    network.add(FakeNode("a", 0, 4, error=ErrorCode.BAD_REQUEST, error_text="x" * 2**20))
    session, manager = _session(runtime, network, max_retries=0)
    with caplog.at_level("WARNING"), pytest.raises(InferenceFailedError, match="bad_request") as error:
        session.step(_chunks(1)[0])
    assert len(str(error.value)) < 2000 and "more characters" in str(error.value)
    assert len(manager.bans[0][1]) < 2000  # the ban's reason, which the real manager logs
    assert all(len(record.getMessage()) < 2000 for record in caplog.records)

    honest = "payment required: reserve escrow for this node, then retry: " + "y" * 540  # as long as a real one
    network = Network()
    network.add(FakeNode("a", 0, 4, error=ErrorCode.CREDIT_LIMIT, error_text=honest))
    session, _ = _session(runtime, network, max_retries=0)
    with pytest.raises(PaymentRequiredError) as error:
        session.step(_chunks(1)[0])
    assert honest in str(error.value)  # what to do next survives the cut


def test_dead_or_missing_nodes_raise_route_unavailable_with_the_blocks(runtime):
    network = Network()
    network.add(FakeNode("a", 0, 2))
    with pytest.raises(RouteUnavailableError, match="No online node serves blocks 2, 3") as error:
        _session(runtime, network)
    assert error.value.blocks == [2, 3] and isinstance(error.value.__cause__, MissingBlocksError)

    network = Network()
    network.add(FakeNode("a", 0, 4, dies_at=0))
    network.add(FakeNode("b", 0, 4, dies_at=0))
    session, _ = _session(runtime, network, max_retries=1)
    with pytest.raises(RouteUnavailableError, match="blocks 0:4") as error:
        session.step(_chunks(1)[0])
    assert (error.value.start, error.value.end) == (0, 4)


def test_a_receipt_rejected_on_the_last_retry_raises_receipt_rejected(runtime):
    network = Network()
    network.add(FakeNode("a", 0, 4, bad_receipt_at=(0,)))
    session, manager = _session(runtime, network, max_retries=0)
    chunks = _chunks(3)
    session.step(chunks[0])
    with pytest.raises(ReceiptRejectedError, match="dishonest receipt"):
        session.step(chunks[1])  # step 0's receipt comes before this answer: the hop fails at once
    assert "dishonest receipt" in manager.bans[0][1]


def test_a_step_that_timed_out_bans_its_node_at_least_the_step_timeout(runtime):
    """A black hole accepts the open and never answers: the client waited a whole step timeout, so the ban must last
    at least that long (a ban of the connect timeout would end before the retry that meets the black hole again)."""
    network = Network()
    hole = network.add(FakeNode("hole", 0, 4, hangs=True))
    network.add(FakeNode("honest", 0, 4))
    session, manager = _session(runtime, network, step_timeout=0.5, connect_timeout=0.2)
    chunks = _chunks(2)
    with session:
        outputs = _generate(session, chunks)
    assert _same(outputs, reference(chunks))
    assert [peer for peer, _ in manager.bans] == [hole.peer_id]
    assert manager.ban_timeouts == [0.5] and "timed out" in manager.bans[0][1]
