"""A real swarm (bootstrap + 3 node processes) on a tiny random Llama with GQA: exactness, failover, tuning,
bad input, forged announcements."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.protocol import RPC_FORWARD, RPC_INFERENCE, make_request, module_uid
from nectar.wire.transport import call_stream

from .conftest import layer_outputs

pytestmark = pytest.mark.slow
NODE_ARGS = ["--throughput", "100", "--announce-period", "2"]


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.add_node(
            tiny_llama, blocks=(0, 2), name="a", extra_args=NODE_ARGS + ["--session-timeout", "4", "--cache-mb", "16"]
        )
        swarm.add_node(tiny_llama, blocks=(2, 4), name="b", extra_args=NODE_ARGS)
        swarm.add_node(tiny_llama, blocks=(2, 4), name="c", extra_args=NODE_ARGS + ["--receipt-signer", "loop"])
        swarm.wait_for_blocks(tiny_llama, 4, min_nodes=1)
        swarm.wait_for_blocks(tiny_llama, 4, min_nodes=1)
        yield swarm


@pytest.fixture(scope="module")
def model(swarm, tiny_llama):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(step_timeout=20, connect_timeout=10)
    )
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _span(model, name: str, start: int, end: int):
    """A hop asking node ``name`` for blocks [start, end) (any sub-span of what it hosts)."""
    from nectar.client.routing import RemoteSpan

    model.sequence_manager.update(force=True)
    for servers in model.sequence_manager.servers().values():
        for peer_id, info in servers.items():
            if info.public_name == name:
                return RemoteSpan(peer_id, start, end, info)
    raise AssertionError(f"node {name} is not announced")


def test_every_span_matches_local_transformers(model, reference):
    input_ids = torch.randint(3, 1000, (2, 7))
    expected = layer_outputs(reference, input_ids)
    caller = model.transformer.caller
    for name, start, end in [("a", 0, 2), ("b", 2, 4), ("c", 2, 4), ("a", 0, 1), ("a", 1, 2), ("c", 3, 4)]:
        span = _span(model, name, start, end)
        output = caller.call(RPC_FORWARD, span, [expected[start]], receipt_inputs=expected[start])[0]
        torch.testing.assert_close(output, expected[end], atol=1e-4, rtol=0)
    # the whole chain, differentiably, through the public module
    torch.testing.assert_close(model.transformer(expected[0]), expected[4], atol=1e-4, rtol=0)


def test_inference_steps_match_full_forward(model, reference):
    input_ids = torch.randint(3, 1000, (1, 9))
    expected = layer_outputs(reference, input_ids)[-1]
    embeds = model.head.embed(input_ids)
    with model.inference_session(max_length=16) as session:
        outputs = [session.step(embeds[:, :5])]
        for t in range(5, 9):
            outputs.append(session.step(embeds[:, t : t + 1]))
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-4, rtol=0)


def test_generation_equals_local_transformers(model, reference):
    for seed in range(3):
        input_ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(seed))
        ours = model.generate(input_ids, max_new_tokens=24, do_sample=False)
        theirs = reference.generate(input_ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert ours.tolist() == theirs[:, : ours.shape[1]].tolist()
    batch = torch.randint(3, 1000, (2, 5))
    assert (
        model.generate(batch, max_new_tokens=8, do_sample=False).tolist()
        == reference.generate(batch, max_new_tokens=8, do_sample=False, eos_token_id=None).tolist()
    )


@pytest.mark.parametrize("format", ["bf16", "int8"])
def test_greedy_generation_through_the_low_precision_check_equals_local_transformers(model, reference, format):
    from nectar.models.greedy_head import LowPrecisionArgmax

    head, rows_checked = model.head, []
    # forced: a head this small skips the check
    argmax = LowPrecisionArgmax(head.lm_head.weight.t(), head.lm_head.bias, format=format)
    head.greedy_argmax = lambda rows, **kwargs: rows_checked.append(len(rows)) or argmax(rows, **kwargs)
    try:
        for seed in range(3):
            input_ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(10 + seed))
            ours = model.generate(input_ids, max_new_tokens=24, do_sample=False)
            theirs = reference.generate(input_ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
            assert ours.tolist() == theirs[:, : ours.shape[1]].tolist()
    finally:
        head.greedy_argmax = None
    assert len(rows_checked) == 3 * 24


def test_sampling_options_and_receipts(model):
    input_ids = torch.randint(3, 1000, (1, 4))
    paid_before = len(model.wallet.receipts)
    a = model.generate(
        input_ids,
        max_new_tokens=10,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        repetition_penalty=1.3,
        seed=7,
    )
    b = model.generate(
        input_ids,
        max_new_tokens=10,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        repetition_penalty=1.3,
        seed=7,
    )
    assert a.shape == (1, 14) and a.tolist() == b.tolist()  # same seed, same tokens
    # one verified receipt per hop per step (2 generations x 10 steps x 2 hops)
    assert len(model.wallet.receipts) - paid_before == 40


def _auth(model, span, uid: str, session_id: bytes) -> dict:
    """The client's signature of a raw open (nodes serve signed opens only, issue 22)."""
    from nectar.wire.messages import ClientAuth

    return ClientAuth.sign(
        model.wallet.private_key,
        kind="open",
        uid=uid,
        session_id=session_id,
        step=0,
        node=span.info.eth_address,
        peer_id=str(span.peer_id),
    ).to_wire()


def _inference_replies(model, span, metadata: dict, hidden: torch.Tensor) -> list:
    """A raw inference stream to one node: open with a first step, then end the stream; every reply it sent."""
    from nectar.wire.protocol import unpack_metadata, unpack_tensors

    uid = module_uid(model.sequence_manager.model_id, span.start, span.end)
    opening = {
        "type": "open",
        "session_id": b"raw-receipts",
        "max_length": 8,
        "client": model.wallet.address,
        **metadata,
        "step": 0,
        "auth": _auth(model, span, uid, b"raw-receipts"),
    }

    async def exchange():
        async def requests():
            yield make_request(uid, [hidden], opening)
            await asyncio.sleep(0.5)  # the stream stays open until both replies have come

        stream = await call_stream(model.runtime.p2p, span.peer_id, RPC_INFERENCE, requests())
        return [(unpack_tensors(r.tensors), unpack_metadata(r.metadata)) async for r in stream]

    return model.runtime.run(exchange(), timeout=30)


def test_receipt_follows_the_output_as_its_own_message(model):
    from nectar.deployment import domain_from_deployment
    from nectar.wire import eip712, fingerprints
    from nectar.wire import receipts as schema

    span = _span(model, "a", 0, 2)
    hidden = torch.randn(1, 3, model.head.embedding_dim)
    (outputs, first), (after, second) = _inference_replies(model, span, {"receipts": "separate"}, hidden)
    assert first.get("receipt_follows") is True and "receipt" not in first and len(outputs) == 1
    assert after == [] and second["type"] == "receipt" and second["step"] == 0
    signed = schema.SignedReceipt.from_json(second["receipt"])
    assert eip712.recover_receipt_signer(signed, domain_from_deployment()).lower() == span.info.eth_address.lower()
    assert signed.receipt.output_commitment == fingerprints.commit_tensor(outputs[0])
    assert signed.receipt.input_commitment == fingerprints.commit_tensor(hidden)
    # without the option, the receipt rides in the output's own reply (older clients, raw callers)
    ((inline_outputs, inline),) = _inference_replies(model, span, {}, hidden)
    assert "receipt" in inline and torch.allclose(inline_outputs[0], outputs[0])


def test_a_receipt_comes_while_the_next_step_computes_or_once_the_stream_is_quiet(model):
    """Receipt N is signed while step N+1 computes, so it comes between output N and output N+1; the last one comes
    when the client asks for it (flush), or as the client ends the stream."""
    from nectar.wire.protocol import unpack_metadata

    span = _span(model, "a", 0, 2)
    uid = module_uid(model.sequence_manager.model_id, span.start, span.end)
    hidden = [torch.randn(1, 3, model.head.embedding_dim), torch.randn(1, 1, model.head.embedding_dim)]

    async def exchange(session_id: bytes, hold_open: bool) -> list:
        outputs = asyncio.Queue()

        async def requests():
            yield make_request(
                uid,
                [hidden[0]],
                {
                    "type": "open",
                    "session_id": session_id,
                    "max_length": 8,
                    "client": model.wallet.address,
                    "receipts": "separate",
                    "step": 0,
                    "auth": _auth(model, span, uid, session_id),
                },
            )
            await outputs.get()  # step 1 leaves only once output 0 is here, as a client's next token would
            yield make_request(uid, [hidden[1]], {"type": "step", "session_id": session_id, "step": 1})
            await outputs.get()
            if hold_open:
                yield make_request(uid, [], {"type": "flush", "session_id": session_id})  # receipt 1 now
                await asyncio.sleep(0.5)

        replies = []
        async for response in await call_stream(model.runtime.p2p, span.peer_id, RPC_INFERENCE, requests()):
            metadata = unpack_metadata(response.metadata)
            replies.append(("output" if response.tensors else metadata.get("type"), metadata.get("step")))
            if response.tensors:
                outputs.put_nowait(None)
        return replies

    for session_id, hold_open in ((b"receipt-order-open", True), (b"receipt-order-ended", False)):
        replies = model.runtime.run(exchange(session_id, hold_open), timeout=30)
        assert replies == [("output", None), ("receipt", 0), ("output", None), ("receipt", 1)], (hold_open, replies)


def test_failover_mid_generation_gives_identical_output(swarm, model, reference):
    input_ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(42))
    expected = reference.generate(input_ids, max_new_tokens=30, do_sample=False, eos_token_id=None)
    session = model.inference_session(max_length=36)
    victim_peer = session.route[-1].peer_id
    victim = next(n for n in swarm.nodes if n.address.endswith(str(victim_peer)))
    tokens = []
    for i, token in enumerate(model.stream_generate(input_ids, max_new_tokens=30, do_sample=False, session=session)):
        tokens.append(int(token[0]))
        if i == 10:
            swarm.kill(victim)  # abrupt: no goodbye on the DHT
    session.close()
    assert session.failovers >= 1
    assert victim_peer not in [span.peer_id for span in session.route]
    assert input_ids[0].tolist() + tokens == expected[0].tolist()


def test_prompt_tuning_lowers_loss(model, tiny_llama, swarm):
    for mode in ("ptune", "deep_ptune"):
        tuned = DistributedModelForCausalLM(
            model.model_path,
            model.model_id,
            config=model.client_config,
            runtime=model.runtime,
            wallet=model.wallet,
            tuning_mode=mode,
            pre_seq_len=3,
        )
        data = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=0.05)
        losses = []
        for _ in range(8):
            loss, _ = tuned(data, labels=data)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.05, (mode, losses)
        # a tuned model still generates through the swarm with its prefix
        assert tuned.generate(data[:1, :4], max_new_tokens=3).shape == (1, 7)
