"""Unpaid compute, impersonation and cache holding against real node processes (issue 22).

Each attack here succeeded before the fix (run with the package of the commit before it: the node flags and client
signing it lacks are left out there, so the attack itself runs unchanged):

- claiming a victim's address in an unsigned open spent the victim's credit at the node, and the victim was refused;
- anonymous forward calls shared one zero-address credit bucket, served until one caller exhausted it;
- two sessions holding the whole KV cache with a ``flush`` every second outlived the session timeout, so an honest
  client was locked out (and told that no online node serves its blocks);
- on a private node (no ledger, trusting vouchers), every throwaway address got the whole credit limit, and sessions
  opened under throwaway addresses held the whole cache against a client the node trusts.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch
from eth_account import Account
from hivemind.p2p import PeerID

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.node.config import NodeConfig
from nectar.node.local_swarm import LocalSwarm
from nectar.wire import messages
from nectar.wire.protocol import RPC_FORWARD, RPC_INFERENCE, make_request, unpack_metadata
from nectar.wire.transport import call_once, call_stream

pytestmark = pytest.mark.slow
HIDDEN, UID = 64, "tiny-llama[0:4]"
PRICE = 10**9  # credit wei per token per block
LIMIT = 10 * PRICE * 4  # the node's credit limit: 10 tokens through its 4 blocks
SIGNS = hasattr(messages.Open, "signed")  # the fixed client signs its opens; the code before it had no signatures


FRIENDS = [Account.create() for _ in range(2)]  # the clients a private node trusts


def _node_args(*args: str, trusted: tuple[str, ...] = ()) -> list[str]:
    """A paid node without a ledger trusts the vouchers of ``trusted`` (the code before the allowlist had one
    switch for all addresses, ``--trust-vouchers``: the attacks below ran against that)."""
    if "trust_vouchers" in NodeConfig.__dataclass_fields__:
        args = (*args, "--trust-vouchers")
    elif trusted:
        args = (*args, "--trusted-clients", ",".join(trusted))
    return ["--throughput", "100", "--num-threads", "1", *args]


def _peer(node) -> PeerID:
    return PeerID.from_base58(node.address.rsplit("/", 1)[-1])


def _client(swarm, tiny_llama, key: str | None = None, **config) -> DistributedModelForCausalLM:
    config = ClientConfig(**{"max_retries": 0, "step_timeout": 10, **config})
    return DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, private_key=key, config=config
    )


def _generate(model, tokens: int = 4) -> torch.Tensor:
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=tokens, do_sample=False)
    assert out.shape == (1, 3 + tokens)
    return out


async def _stream(model, peer, messages_, *, pause: float = 0.0, until: float | None = None):
    """Sends ``messages_`` on one inference stream (then repeats the last one every ``pause`` s until ``until``);
    returns the replies' metadata, or the error's text."""

    async def requests():
        for message in messages_:
            yield message
        while until is not None and time.monotonic() < until:
            await asyncio.sleep(pause)
            yield messages_[-1]

    replies = []
    try:
        async for response in await call_stream(model.runtime.p2p, peer, RPC_INFERENCE, requests()):
            replies.append(unpack_metadata(response.metadata))
    except Exception as e:
        return replies, str(e)
    return replies, None


# ---- paid node, no ledger: impersonation and the anonymous bucket --------------------------------------------------


@pytest.fixture(scope="module")
def paid(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("paid")) as swarm:
        swarm.add_node(
            tiny_llama,
            blocks=(0, 4),
            name="paid",
            extra_args=_node_args(
                "--price", str(PRICE), "--credit-limit", str(LIMIT), trusted=tuple(f.address for f in FRIENDS)
            ),
        )
        swarm.wait_for_blocks(tiny_llama, 4)
        yield swarm


def test_claiming_a_victims_address_is_refused_and_leaves_its_credit(paid, tiny_llama):
    """The attacker names the victim as client (unsigned, or signed with its own key) and never pays: before, the
    node charged the victim for it until the victim's credit was spent, and refused the victim."""
    victim, attacker = FRIENDS[0], Account.create()
    node = paid.nodes[0]
    model = _client(paid, tiny_llama, key=victim.key.hex())
    try:
        peer = _peer(node)
        served = refused = 0
        for i in range(4):  # each open carries 6 tokens: 24 tokens, over the victim's 10-token credit
            sid = f"imp{i}".encode()
            meta = {"type": "open", "session_id": sid, "max_length": 8, "client": victim.address, "step": 0}
            opening = make_request(UID, [torch.randn(1, 6, HIDDEN)], meta)
            replies, error = model.runtime.run(_stream(model, peer, [opening]), timeout=30)
            served, refused = served + len(replies), refused + (error is not None)
            if SIGNS:  # signed by the attacker, naming the victim
                signed = messages.Open(UID, sid + b"s", 8, client=victim.address).signed(
                    attacker.key, node=node.eth_address, peer_id=str(peer)
                )
                claimed = messages.Open(
                    UID,
                    signed.session_id,
                    8,
                    1,
                    victim.address,
                    first_step=messages.Step(sid, 0, hidden=torch.randn(1, 6, HIDDEN)),
                    auth=signed.auth,
                )
                replies, error = model.runtime.run(_stream(model, peer, [claimed.to_request()]), timeout=30)
                assert error is not None and "forbidden" in error and not replies
        assert served == 0, f"the node served {served} steps billed to the victim's address without its signature"
        _generate(model, 4)  # the victim's credit is untouched: it is served (7 tokens, under its limit)
    finally:
        model.shutdown()


def test_anonymous_forward_calls_get_no_shared_bucket(paid, tiny_llama):
    """Before, unsigned forward calls were billed to the zero address: one caller spent that bucket for every other
    anonymous caller. Now an unsigned call is refused outright, and a signed one is billed to its signer."""
    model = _client(paid, tiny_llama, key=FRIENDS[1].key.hex())
    try:
        peer, served, errors = _peer(paid.nodes[0]), 0, []
        for _ in range(6):  # 6 x 4 tokens: over the 10-token limit of any one bucket
            request = make_request(UID, [torch.randn(1, 4, HIDDEN)], {})
            try:
                model.runtime.run(call_once(model.runtime.p2p, peer, RPC_FORWARD, request, timeout=20), timeout=30)
                served += 1
            except Exception as e:
                errors.append(str(e))
        assert served == 0, f"{served} anonymous forward calls were served on a shared credit bucket"
        assert all("forbidden" in e and "signed" in e for e in errors), errors[:1]
        _generate(model, 2)  # signed clients are unaffected
    finally:
        model.shutdown()


# ---- cache holding ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("small")) as swarm:
        swarm.add_node(
            tiny_llama, blocks=(0, 4), name="small", extra_args=_node_args("--session-timeout", "3", "--cache-mb", "1")
        )
        swarm.wait_for_blocks(tiny_llama, 4)
        yield swarm


def _holder_open(node, peer, sid: bytes, max_length: int):
    opening = messages.Open(UID, sid, max_length)
    if SIGNS:  # a paying client of its own: the fixed node serves signed opens only
        opening = opening.signed(Account.create().key, node=node.eth_address, peer_id=str(peer))
    return opening.to_request()


def test_held_sessions_flushing_do_not_lock_an_honest_client_out(small, tiny_llama):
    """Two sessions fill the node's KV cache and send a flush every second, no step. Before, a flush counted as
    activity: the sessions outlived the 3 s timeout and an honest client was refused (as 'no online node serves
    blocks') for as long as the attacker liked. Now they are freed 3 s after their last paid step, and while the
    node is full the client hears it is busy (and does not ban it)."""
    node = small.nodes[0]
    model = _client(small, tiny_llama)
    try:
        peer = _peer(node)
        probe, _ = model.runtime.run(_stream(model, peer, [_holder_open(node, peer, b"probe", 2)]), timeout=30)
        total = probe[0]["cache_tokens_left"] + 2  # the node's whole budget in tokens
        until = time.monotonic() + 25
        flush = [messages.Flush(b"h1").to_request(UID), messages.Flush(b"h2").to_request(UID)]
        holders = [
            asyncio.run_coroutine_threadsafe(
                _stream(model, peer, [_holder_open(node, peer, sid, size), f], pause=1.0, until=until),
                model.runtime.loop,
            )
            for sid, size, f in ((b"h1", total // 2, flush[0]), (b"h2", total - total // 2, flush[1]))
        ]
        time.sleep(1.0)  # both holders opened
        began, busy, done = time.monotonic(), [], None
        while time.monotonic() - began < 15:
            try:
                _generate(model, 2)
                done = time.monotonic() - began
                break
            except Exception as e:
                busy.append(e)
                time.sleep(0.5)
        assert done is not None, f"an honest client was locked out for 15 s by two flushing sessions: {busy[-1]}"
        assert busy, "the holders never filled the cache: the attack did not run"
        assert "busy" in str(busy[0]) and type(busy[0]).__name__ == "NodeBusyError", repr(busy[0])
        for holder in holders:
            _, error = holder.result(timeout=30)
            assert error is not None and "session_expired" in error, error
    finally:
        model.shutdown()


# ---- a private node: trusted clients, and a free allowance for everyone else ---------------------------------------

FREE_TOKENS = 12  # the node-wide free allowance, in tokens through the node's 4 blocks, an hour


def _private(tiny_llama, workdir, *args: str):
    swarm = LocalSwarm(workdir=workdir)
    swarm.add_node(
        tiny_llama,
        blocks=(0, 4),
        name="private",
        extra_args=_node_args(
            "--price",
            str(PRICE),
            "--credit-limit",
            str(LIMIT),
            *args,
            trusted=(FRIENDS[0].address,),
        ),
    )
    swarm.wait_for_blocks(tiny_llama, 4)
    return swarm


@pytest.fixture(scope="module")
def private(tiny_llama, tmp_path_factory):
    free = ("--free-credit-per-hour", str(FREE_TOKENS * PRICE * 4))
    with _private(tiny_llama, tmp_path_factory.mktemp("private"), *free) as swarm:
        yield swarm


def _paid_open(node, peer, key, tokens: int) -> messages.Open:
    """An open signed by ``key`` carrying a first step of ``tokens`` tokens."""
    sid = os.urandom(8)
    step = messages.Step(sid, 0, hidden=torch.randn(1, tokens, HIDDEN))
    address = Account.from_key(key).address
    opening = messages.Open(UID, sid, tokens + 2, 1, address, first_step=step)
    return opening.signed(key, node=node.eth_address, peer_id=str(peer)).to_request()


def test_rotating_throwaway_keys_gets_no_more_than_the_private_nodes_free_allowance(private, tiny_llama):
    """Before, a private node (``--trust-vouchers``) gave every new signed address the whole credit limit: rotating
    keys got free steps without end (743 in the attack benchmark). Now only its trusted clients get credit; all
    other addresses together get the node-wide free allowance (12 tokens an hour here), and the friend is served."""
    node = private.nodes[0]
    model = _client(private, tiny_llama, key=FRIENDS[0].key.hex())
    try:
        peer, served, errors = _peer(node), 0, []
        for _ in range(10):  # 10 fresh keys, 6 tokens each: 60 tokens, each key well under the credit limit
            opening = _paid_open(node, peer, Account.create().key, 6)
            replies, error = model.runtime.run(_stream(model, peer, [opening]), timeout=30)
            served += 6 * bool(replies)
            errors += [error] if error else []
        assert served <= FREE_TOKENS, f"throwaway keys got {served} tokens, over the {FREE_TOKENS}-token allowance"
        assert errors and all("--trusted-clients" in e for e in errors), errors[:1]
        _generate(model, 4)  # the trusted client is served on its vouchers (7 tokens, under its limit)
    finally:
        model.shutdown()


@pytest.fixture(scope="module")
def private_cache(tiny_llama, tmp_path_factory):
    # an ample free allowance, so strangers may open sessions; a session timeout longer than the test
    args = ("--free-credit-per-hour", str(10**6 * PRICE), "--cache-mb", "1", "--session-timeout", "60")
    with _private(tiny_llama, tmp_path_factory.mktemp("private_cache"), *args) as swarm:
        yield swarm


async def _hold(model, node, peer, size: int, until: float) -> int:
    """Keeps a session of ``size`` tokens open under a throwaway key (a flush a second), reopened under a new key
    whenever the node ends or refuses it, until ``until``; returns how many opens the node accepted."""
    opened = 0
    while time.monotonic() < until:
        sid = os.urandom(8)
        flush = messages.Flush(sid).to_request(UID)
        replies, _ = await _stream(model, peer, [_holder_open(node, peer, sid, size), flush], pause=1.0, until=until)
        opened += bool(replies)
        await asyncio.sleep(0.2)
    return opened


def test_cache_held_under_throwaway_keys_does_not_lock_out_a_trusted_client(private_cache, tiny_llama):
    """Twelve holders, each under its own throwaway key, fill the private node's cache (each under one client's
    share), reopening under a new key whenever a session ends. Before, each key had its own share and the trusted
    client was locked out. Now they hold at most the unbacked share together and give way to it."""
    node = private_cache.nodes[0]
    model = _client(private_cache, tiny_llama, key=FRIENDS[0].key.hex())
    try:
        peer = _peer(node)
        probe, _ = model.runtime.run(_stream(model, peer, [_holder_open(node, peer, b"probe", 2)]), timeout=30)
        total = probe[0]["cache_tokens_left"] + 2  # the node's whole budget in tokens
        until = time.monotonic() + 25
        holders = [
            asyncio.run_coroutine_threadsafe(_hold(model, node, peer, total // 12, until), model.runtime.loop)
            for _ in range(12)
        ]
        time.sleep(2.0)  # the holders opened
        began, busy, done = time.monotonic(), [], None
        while time.monotonic() - began < 15:
            try:
                _generate(model, 2)
                done = time.monotonic() - began
                break
            except Exception as e:
                busy.append(e)
                time.sleep(0.5)
        opened = [holder.result(timeout=60) for holder in holders]
        assert done is not None, f"a trusted client was locked out for 15 s by throwaway keys' sessions: {busy[-1]}"
        assert sum(opened) >= 1, "no holder ever opened: the attack did not run"
    finally:
        model.shutdown()
