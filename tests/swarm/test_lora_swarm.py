"""A real swarm with a LoRA adapter (issue 23, item 4): node "a" serves blocks 0:4 with adapter style-a, node "b"
the same blocks without. Greedy text with the adapter equals PEFT's own, routes avoid "b", and unknown adapters or
paths are refused."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
import torch
from eth_account import Account
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.client.routing import MissingBlocksError, RemoteSequenceManager, RemoteSpan
from nectar.ledger.adapter_store import AdapterStore
from nectar.ledger.core.config import Settings
from nectar.ledger.spot_check import AuditFailed, LocalVerifier, SpotChecker
from nectar.ledger.swarm import SwarmView
from nectar.ledger.swarm_audit import RpcAuditSource
from nectar.models.adapters import adapter_digest
from nectar.models.tiny import save_tiny_lora
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.fingerprints import ComputeSpec, fingerprint_hash
from nectar.wire.messages import ClientAuth, ForwardCall, ForwardReply
from nectar.wire.protocol import RPC_FORWARD, RPC_INFERENCE, make_request, unpack_metadata
from nectar.wire.receipts import SignedReceipt
from nectar.wire.stubs import call_forward
from nectar.wire.transport import call_once, call_stream

from .conftest import layer_outputs

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow
NODE_ARGS = ["--throughput", "100", "--announce-period", "2"]
UID = "tiny-llama[0:4]"


VERIFIER = Account.create()  # node "a" answers its audits (and adapter calls)


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return save_tiny_lora(tmp_path_factory.mktemp("adapters") / "style-a", tiny_llama, seed=5)


@pytest.fixture(scope="module")
def swarm(tiny_llama, adapter, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        a_args = NODE_ARGS + ["--adapters", str(adapter), "--audit-verifiers", VERIFIER.address]
        swarm.add_node(tiny_llama, blocks=(0, 4), name="a", extra_args=a_args)
        swarm.add_node(tiny_llama, blocks=(0, 4), name="b", extra_args=NODE_ARGS)
        swarm.wait_for_blocks(tiny_llama, 4, min_nodes=2)
        yield swarm


@pytest.fixture(scope="module")
def model(swarm, tiny_llama):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama,
        initial_peers=swarm.initial_peers,
        config=ClientConfig(max_retries=0, step_timeout=20, connect_timeout=10),
        active_adapter="style-a",
    )
    yield model
    model.shutdown()


def _peers(model) -> dict[str, tuple[PeerID, object]]:
    model.sequence_manager.update(force=True)
    return {info.public_name: (peer, info) for peer, info in model.sequence_manager.servers()[0].items()}


def test_records_list_the_adapter(model):
    peers = _peers(model)
    assert peers["a"][1].adapters == ["style-a"] and peers["b"][1].adapters == []


@pytest.fixture(scope="module")
def references(tiny_llama, adapter):
    """(transformers' base model, PEFT's adapted model) on the same checkpoint."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    adapted = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return base, peft.PeftModel.from_pretrained(adapted, str(adapter)).eval()


def test_greedy_text_with_the_adapter_equals_peft(model, references):
    base, adapted = references
    ids = torch.tensor([[5, 17, 230, 41, 9]])
    with torch.no_grad():
        plain = base.generate(ids, max_new_tokens=8, do_sample=False)
        expected = adapted.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)  # the adapter changed the text: not the base model answered


def test_routes_use_only_nodes_that_serve_the_adapter(model, references):
    peers = _peers(model)
    a, b = peers["a"][0], peers["b"][0]
    base = RemoteSequenceManager(model.runtime, "tiny-llama", 4, config=model.client_config)
    assert set(base._candidates(0, 4)) == {a, b}  # both would do for the base model
    for _ in range(5):
        assert [span.peer_id for span in model.sequence_manager.make_inference_route(0, 4)] == [a]
        assert [span.peer_id for span in model.sequence_manager.make_training_route(0, 4)] == [a]
    # forward and backward (training) go through "a" with the adapter: PEFT's hidden states, gradients flow
    expected = layer_outputs(references[1].base_model.model, torch.tensor([[5, 17, 230, 41, 9]]))
    hidden = expected[0].clone().requires_grad_(True)
    output = model.transformer(hidden)
    torch.testing.assert_close(output, expected[4], atol=1e-4 * expected[4].abs().max().item(), rtol=0)
    output.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_receipts_bind_the_adapters_digest(model, adapter):
    peer, info = _peers(model)["a"]
    digest = hashlib.sha256(
        (adapter / "adapter_config.json").read_bytes() + (adapter / "adapter_model.safetensors").read_bytes()
    ).digest()
    key = model.wallet.private_key
    for name, expected in (("style-a", digest), (None, b"")):
        call = ForwardCall(UID, torch.randn(1, 3, 64), session_id=os.urandom(16), step=0, adapter=name, backward=False)
        call = call.signed(key, node=info.eth_address, peer_id=str(peer))
        reply = model.runtime.run(call_forward(model.runtime.p2p, peer, None, call, timeout=20), timeout=30)
        assert ComputeSpec.decode(reply.fingerprint).adapter == expected
        assert fingerprint_hash(reply.fingerprint) == SignedReceipt.from_json(reply.receipt).receipt.fingerprint


def test_a_node_refuses_an_adapter_it_does_not_serve(model):
    peers = _peers(model)
    peer, info = peers["b"]
    caller = model.transformer.caller  # its calls name style-a
    with pytest.raises(Exception) as error:
        caller.call(RPC_FORWARD, RemoteSpan(peer, 0, 4, info), [torch.randn(1, 3, 64)], receipt_inputs=None)
    assert "unknown_adapter" in str(error.value) and "style-a" in str(error.value)
    # an open for it is refused too, before any cache is reserved
    replies = model.runtime.run(_inference(model, peer, [_open(peer, info, adapter="style-a")]), timeout=30)
    assert "unknown_adapter" in replies


def test_an_adapter_nobody_serves_names_itself(model):
    manager = RemoteSequenceManager(model.runtime, "tiny-llama", 4, config=model.client_config, active_adapter="nope")
    with pytest.raises(MissingBlocksError, match="adapter 'nope'"):
        manager.make_inference_route(0, 4)


def test_a_path_is_no_adapter_name(model, adapter):
    with pytest.raises(ValueError, match="no paths"):  # the client refuses before asking anyone
        RemoteSequenceManager(model.runtime, "tiny-llama", 4, config=model.client_config, active_adapter=str(adapter))
    # and nodes refuse it from a client that sends it anyway
    peer, info = _peers(model)["a"]
    for name in (str(adapter), "../style-a", "style-a/../../etc"):
        replies = model.runtime.run(_inference(model, peer, [_open(peer, info, adapter=name)]), timeout=30)
        assert "bad_request" in replies and "no paths" in replies
        request = make_request(UID, [torch.randn(1, 3, 64)], _signed(RPC_FORWARD, {"adapter": name}, peer, info))
        with pytest.raises(Exception, match="bad_request"):
            model.runtime.run(call_once(model.runtime.p2p, peer, RPC_FORWARD, request, timeout=20), timeout=30)


def test_the_ledger_audits_an_adapter_step_with_the_files_fetched_from_its_node(swarm, tiny_llama, adapter, tmp_path):
    """Issue 21: verifiers that hold no copy of the adapter fetch it from the node that signed the receipt (by
    digest, over the swarm, signed by a registered verifier), check it, and judge the step; another digest is the
    node's failure."""
    view = SwarmView(swarm.initial_peers)
    try:
        entry = next(e for e in view.serving("tiny-llama", 0, 4) if e.info.adapters == ["style-a"])
        client = Account.create()
        call = ForwardCall(UID, torch.randn(1, 3, 64), client=client.address, adapter="style-a", backward=False)
        call = call.signed(client.key, node=entry.info.eth_address, peer_id=str(entry.peer_id))
        reply = ForwardReply.decode(view.call(entry.peer_id, call.rpc, call.to_request(), timeout=20))
        receipt = SignedReceipt.from_json(reply.receipt).receipt
        digest = ComputeSpec.decode(reply.fingerprint).adapter

        audit = RpcAuditSource(view, key=VERIFIER.key, window_s=2, adapters=AdapterStore(tmp_path / "fetched"))
        verifiers = [LocalVerifier({"tiny-llama": tiny_llama}, name=n) for n in ("a", "b")]  # no adapters of their own
        settings = Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}", deployment_path=tmp_path / "none.json")
        checker = SpotChecker(settings=settings, engine=None, verifiers=verifiers, audit=audit)  # a forward: no db
        verdict = checker._judge(receipt, reply.fingerprint)
        assert verdict.status == "passed", verdict.detail
        assert adapter_digest(audit.adapters.get(digest)) == digest == adapter_digest(adapter)
        with pytest.raises(AuditFailed, match="unknown_adapter"):  # the node answered: no window to wait out
            audit.adapter(receipt, bytes(32))
    finally:
        view.shutdown()


CLIENT = Account.create()


def _signed(kind: str, metadata: dict, peer, info) -> dict:
    auth = ClientAuth.sign(
        CLIENT.key,
        kind=kind,
        uid=UID,
        session_id=metadata.get("session_id"),
        step=0,
        node=info.eth_address,
        peer_id=str(peer),
        adapter=metadata.get("adapter"),
    )
    return {**metadata, "client": CLIENT.address, "auth": auth.to_wire()}


def _open(peer, info, **fields):
    metadata = {"type": "open", "session_id": b"s" * 16, "max_length": 8, "batch_size": 1, **fields}
    return make_request(UID, [], _signed("open", metadata, peer, info))


async def _inference(model, peer, messages) -> str:
    """What the node answered (its error's text, or the metadata of its answers)."""

    async def requests():
        for message in messages:
            yield message
        await asyncio.sleep(1)

    answers = []
    try:
        async for response in await call_stream(model.runtime.p2p, peer, RPC_INFERENCE, requests()):
            answers.append(str(unpack_metadata(response.metadata)))
    except Exception as e:
        answers.append(str(e))
    return " ".join(answers)
