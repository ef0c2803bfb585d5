"""Framing an honest node (issue 20): a client tries to get two receipts for one work key out of a real node process
and slash it on a real Anvil with them. A node binds every session to a nonce of its own and never signs one work
key twice, so all it can get is receipts that do not conflict; before that, each of these attacks slashed the node.

The attacks use only what a client controls: the session id, the step number, the position, and inputs the receipt
does not commit to (the cache before a step, a forward's deep prompts)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nectar.chain import ChainError
from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.local_swarm import LocalSwarm
from nectar.wire import eip712
from nectar.wire import receipts as schema
from nectar.wire.dht import ClientRuntime
from nectar.wire.messages import ForwardCall, ForwardReply, Open, Opened, Step, StepReply, decode_inference_reply
from nectar.wire.protocol import RPC_FORWARD, RPC_INFERENCE
from nectar.wire.transport import call_once, call_stream

pytestmark = pytest.mark.slow
ETHER = 10**18
HIDDEN = 64
STAKE = 1_000 * ETHER


@dataclass
class Victim:
    runtime: ClientRuntime
    peer: str
    address: str
    swarm: LocalSwarm
    process: object
    keys: Path
    checkpoint: str

    def __iter__(self):  # runtime, peer, address
        return iter((self.runtime, self.peer, self.address))


@pytest.fixture(scope="module")
def victim(devnet, chain, roles, tmp_path_factory):
    """One honest node process (tiny llama, blocks 0:4) signing under the deployment's domain, registered with
    ``STAKE``, and a client runtime for the attacker."""
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", seed=0)
    account = roles["node"][0]
    workdir = tmp_path_factory.mktemp("swarm")
    keys = workdir / "keys" / "victim"
    keys.mkdir(parents=True)  # the node signs with a funded devnet account, so it can stake
    (keys / "eth.json").write_text(json.dumps({"address": account["address"], "private_key": account["privateKey"]}))
    with LocalSwarm(workdir=workdir, env={"NECTAR_DEPLOYMENT": str(devnet.deployment_path)}) as swarm:
        node = swarm.add_node(str(checkpoint), blocks=(0, 4), name="victim", extra_args=["--throughput", "100"])
        assert node.eth_address == account["address"]
        peer = node.address.rsplit("/", 1)[-1]
        chain.register_node(account["privateKey"], peer, STAKE)
        runtime = ClientRuntime(swarm.initial_peers)
        try:
            yield Victim(runtime, peer, account["address"], swarm, node, keys, str(checkpoint))
        finally:
            runtime.shutdown()


@pytest.fixture(scope="module")
def attacker(roles) -> dict:
    return roles["client"][0]


def _uid() -> str:
    return "tiny-llama[0:4]"


async def _converse(runtime, peer: str, messages: list) -> list:
    """Sends ``messages`` on one inference stream, each after the answer to the one before; the answers (a
    ``NodeRPCError``-like exception last if the node refused one)."""
    from hivemind.p2p import PeerID

    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    queue.put_nowait(messages[0].to_request())
    replies = []
    try:
        stream = (await call_stream(runtime.p2p, PeerID.from_base58(peer), RPC_INFERENCE, requests())).__aiter__()
        replies.append(decode_inference_reply(await asyncio.wait_for(stream.__anext__(), 30)))
        for message in messages[1:]:
            queue.put_nowait(message.to_request(_uid()))
            replies.append(decode_inference_reply(await asyncio.wait_for(stream.__anext__(), 30)))
    except Exception as e:
        replies.append(e)
    finally:
        queue.put_nowait(None)
    return replies


def _signed(reply) -> schema.SignedReceipt:
    return schema.SignedReceipt.from_json(reply.receipt)


def _try_slash(chain, attacker: dict, a: schema.SignedReceipt, b: schema.SignedReceipt):
    chain.advance_time(2)  # the receipts' timestamps are in the chain's past
    return chain.slash_double_sign(
        attacker["privateKey"], a.receipt.to_message(), a.signature, b.receipt.to_message(), b.signature
    )


def _refused(chain, attacker, a, b, node: str) -> None:
    stake = chain.stake_of(node)
    try:
        result = _try_slash(chain, attacker, a, b)
    except ChainError as e:
        assert str(e).startswith("ReceiptsDoNotConflict"), e
        return
    taken = stake - chain.stake_of(node)
    pytest.fail(f"the attacker slashed the honest node {node}: {taken / ETHER:.0f} credits taken ({result.tx_hash})")


def test_a_step_sent_twice_under_one_key_gets_the_receipt_already_signed_or_an_error(chain, victim, attacker):
    """One stream: step 1 computed after step 0, retried as it was, then sent again with the same input at position
    0 (another cache state: another output); another stream tries another input under a signed step."""
    runtime, peer, node = victim
    session = b"\x01" * 16
    x, y, z = (torch.randn(1, 1, HIDDEN) for _ in range(3))

    def stream(*steps: Step) -> list:
        opening = Open(_uid(), session, max_length=8).signed(attacker["privateKey"], node=node, peer_id=peer)
        return runtime.run(_converse(runtime, peer, [opening, Step(session, 0, position=0, hidden=x), *steps]), 120)

    replies = stream(
        Step(session, 1, position=1, hidden=y),
        Step(session, 1, position=1, hidden=y),
        Step(session, 1, position=0, hidden=y),
    )
    receipts = [_signed(reply) for reply in replies[2:] if isinstance(reply, StepReply)]
    _refused(chain, attacker, receipts[0], receipts[-1], node)
    assert receipts == [receipts[0]] * 2  # the retry got the receipt already signed, not a new one
    assert "signed already at position 1, not 0" in str(replies[-1])  # never a receipt for another output

    replies = stream(Step(session, 1, position=1, hidden=y), Step(session, 1, position=1, hidden=z))
    assert "signed already, for another input" in str(replies[-1])

    opened = replies[0]
    assert isinstance(opened, Opened) and len(opened.session_nonce) == schema.SESSION_NONCE_BYTES
    assert _signed(replies[2]).receipt.session_id == schema.bind_session(session, opened.session_nonce)
    assert eip712.recover_receipt_signer(receipts[0], chain.eip712_domain()) == node
    assert chain.stake_of(node) == STAKE


def test_two_streams_with_one_client_session_id_share_no_work_key(chain, victim, attacker):
    """Two opens with one session id, the same input at step 1 after different step 0s: before nonces, one work
    key, one input, two outputs."""
    runtime, peer, node = victim
    session = b"\x02" * 16
    x, z, y = (torch.randn(1, 1, HIDDEN) for _ in range(3))

    def stream(first: torch.Tensor) -> list:
        messages = [
            Open(_uid(), session, max_length=8).signed(attacker["privateKey"], node=node, peer_id=peer),
            Step(session, 0, position=0, hidden=first),
            Step(session, 1, position=1, hidden=y),
        ]
        return runtime.run(_converse(runtime, peer, messages), timeout=120)

    a, b = stream(x), stream(z)
    first, second = _signed(a[2]), _signed(b[2])
    assert first.receipt.input_commitment == second.receipt.input_commitment
    assert first.receipt.output_commitment != second.receipt.output_commitment
    _refused(chain, attacker, first, second, node)
    assert a[0].session_nonce != b[0].session_nonce
    assert first.receipt.session_id == schema.bind_session(session, a[0].session_nonce)
    assert second.receipt.session_id == schema.bind_session(session, b[0].session_nonce)


def test_an_open_carrying_its_first_step_returns_the_nonce_with_its_answer(victim, attacker):
    runtime, peer, _ = victim
    session, x = b"\x03" * 16, torch.randn(1, 2, HIDDEN)
    opening = Open(_uid(), session, max_length=8, first_step=Step(session, 0, hidden=x)).signed(
        attacker["privateKey"], node=victim.address, peer_id=peer
    )
    (reply,) = runtime.run(_converse(runtime, peer, [opening]), timeout=120)
    assert isinstance(reply, StepReply) and len(reply.session_nonce) == schema.SESSION_NONCE_BYTES
    assert _signed(reply).receipt.session_id == schema.bind_session(session, reply.session_nonce)


def test_forward_calls_under_one_session_and_step_share_no_work_key(chain, victim, attacker):
    """Two forwards with one session id, step and hidden input, and different deep prompts (which the receipt does
    not commit to): before nonces, one work key, one input, two outputs."""
    from hivemind.p2p import PeerID

    runtime, peer, node = victim
    session, x = b"\x04" * 16, torch.randn(1, 2, HIDDEN)

    def forward(prompts: torch.Tensor) -> ForwardReply:
        call = ForwardCall(_uid(), x, prompts, session_id=session, step=7, backward=False).signed(
            attacker["privateKey"], node=node, peer_id=peer
        )
        request = call_once(runtime.p2p, PeerID.from_base58(peer), RPC_FORWARD, call.to_request(), timeout=60)
        return ForwardReply.decode(runtime.run(request, timeout=90))

    one, two = forward(torch.randn(4, 1, 2, HIDDEN)), forward(torch.randn(4, 1, 2, HIDDEN))
    first, second = _signed(one), _signed(two)
    assert first.receipt.input_commitment == second.receipt.input_commitment
    assert first.receipt.output_commitment != second.receipt.output_commitment
    _refused(chain, attacker, first, second, node)
    assert first.receipt.session_id == schema.bind_session(session, one.session_nonce)
    assert second.receipt.session_id == schema.bind_session(session, two.session_nonce)
    assert chain.stake_of(node) == STAKE


def test_a_node_killed_and_restarted_still_knows_what_it_signed(victim):
    """Last in the module: the journal in the node's key folder outlives a SIGKILL (each record is written before
    its receipt leaves the node), and the restarted node reads every key back."""
    journal = victim.keys / "signed-work"
    signed = sum(path.stat().st_size for path in journal.iterdir())
    assert signed and signed % 8 == 0  # 8 bytes a receipt
    victim.swarm.kill(victim.process)
    again = victim.swarm.add_node(victim.checkpoint, blocks=(0, 4), name="victim", extra_args=["--throughput", "100"])
    assert f"Signed-work journal: {signed // 8} receipts signed within the evidence window" in again.log()
