"""Issue 21: an audit a node cannot answer is a failed spot check, so an honest node that crashes (or is upgraded)
must still answer audits of the steps it served before. A real node process serves steps, is killed with SIGKILL
and restarted on the same key folder, and answers a verifier's signed audit of a pre-restart step with the same
inputs and output (hashing to the receipt's output commitment); before the audit log went to disk it had no
record."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from eth_account import Account
from hivemind.p2p import PeerID

from nectar.node.local_swarm import LocalSwarm
from nectar.wire import receipts as schema
from nectar.wire.dht import ClientRuntime
from nectar.wire.fingerprints import commit_tensor
from nectar.wire.messages import AuditCall, AuditReply, Open, Step, StepReply, decode_inference_reply
from nectar.wire.protocol import RPC_AUDIT, RPC_INFERENCE
from nectar.wire.transport import call_once, call_stream

pytestmark = pytest.mark.slow
HIDDEN, UID = 64, "tiny-llama[0:4]"


async def _converse(runtime, peer: PeerID, messages: list) -> list:
    """Sends ``messages`` on one inference stream, each after the answer to the one before; the answers."""
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    queue.put_nowait(messages[0].to_request())
    try:
        stream = (await call_stream(runtime.p2p, peer, RPC_INFERENCE, requests())).__aiter__()
        replies = [decode_inference_reply(await asyncio.wait_for(stream.__anext__(), 30))]
        for message in messages[1:]:
            queue.put_nowait(message.to_request(UID))
            replies.append(decode_inference_reply(await asyncio.wait_for(stream.__anext__(), 30)))
        return replies
    finally:
        queue.put_nowait(None)


def test_a_node_killed_and_restarted_still_answers_audits_of_earlier_steps(tiny_llama, tmp_path):
    verifier = Account.create()
    args = ["--throughput", "100", "--audit-verifiers", verifier.address]
    with LocalSwarm(workdir=tmp_path) as swarm:
        node = swarm.add_node(tiny_llama, blocks=(0, 4), name="honest", extra_args=args)
        runtime = ClientRuntime(swarm.initial_peers)
        try:
            peer = PeerID.from_base58(node.address.rsplit("/", 1)[-1])
            session, x, y = os.urandom(16), torch.randn(1, 3, HIDDEN), torch.randn(1, 1, HIDDEN)
            replies = runtime.run(
                _converse(
                    runtime,
                    peer,
                    [
                        Open(UID, session, max_length=8).signed(  # nodes serve signed opens only
                            Account.create().key, node=node.eth_address, peer_id=str(peer)
                        ),
                        Step(session, 0, position=0, hidden=x),
                        Step(session, 1, position=3, hidden=y),
                    ],
                ),
                timeout=120,
            )
            assert all(isinstance(reply, StepReply) for reply in replies[1:])
            receipt = schema.SignedReceipt.from_json(replies[2].receipt).receipt
            assert commit_tensor(replies[2].output) == receipt.output_commitment
            swarm.kill(node)

            again = swarm.add_node(tiny_llama, blocks=(0, 4), name="honest", extra_args=args)
            assert again.eth_address == node.eth_address
            call = AuditCall(UID, bytes(receipt.session_id), int(receipt.step)).signed(
                verifier.key, node=again.eth_address, peer_id=again.address.rsplit("/", 1)[-1]
            )
            assert again.address.rsplit("/", 1)[-1] == str(peer)  # the same identity
            auditor = ClientRuntime([again.address])  # the restarted node listens on another port
            try:
                answer = AuditReply.decode(
                    auditor.run(call_once(auditor.p2p, peer, RPC_AUDIT, call.to_request(), timeout=30), timeout=60)
                )
            finally:
                auditor.shutdown()
            assert torch.equal(answer.inputs, torch.cat([x, y], dim=1))
            assert torch.equal(answer.outputs, replies[2].output)
            assert commit_tensor(answer.outputs) == receipt.output_commitment
            assert (answer.start, answer.end) == (0, 4)
            assert "Audit log: 2 steps of 1 sessions kept from before this start" in again.log()
        finally:
            runtime.shutdown()
