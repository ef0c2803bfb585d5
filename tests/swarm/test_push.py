"""Server-to-server push (issue 6): same tokens as relay, really pushed, bad pushes refused, missing pushes and dead
first hops recovered."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.client.inference_session import InferenceSession
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.direct import call_stream_direct
from nectar.wire.protocol import RPC_INFO, RPC_PUSH, make_request, unpack_metadata
from nectar.wire.stubs import call_unary
from nectar.wire.transport import first_response

pytestmark = pytest.mark.slow

PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3]])


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm"), direct=True) as swarm:
        # two nodes for blocks 0:2, so the first hop can fail over (the spare announces a lower throughput)
        swarm.add_node(tiny_llama, blocks=(0, 2), name="first", extra_args=["--throughput", "100"])
        swarm.add_node(tiny_llama, blocks=(2, 4), name="second", extra_args=["--throughput", "100"])
        swarm.add_node(tiny_llama, blocks=(0, 2), name="spare", extra_args=["--throughput", "50"])
        swarm.wait_for_blocks(tiny_llama, 4, min_nodes=1)
        yield swarm


def _model(swarm, tiny_llama, **config):
    return DistributedModelForCausalLM.from_pretrained(
        tiny_llama,
        initial_peers=swarm.initial_peers,
        config=ClientConfig(max_retries=3, step_timeout=10, connect_timeout=10, **config),
    )


@pytest.fixture(scope="module")
def model(swarm, tiny_llama):
    model = _model(swarm, tiny_llama, push=True)
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval().generate(PROMPT, max_new_tokens=8, do_sample=False)


def _infos(model) -> dict:
    servers = model.sequence_manager.servers()
    return {peer: info for block in servers.values() for peer, info in block.items()}


def _counters(model) -> dict:
    """Each node's push counters from its info RPC (peer id -> {"sent", "received"})."""
    counters = {}
    for peer, info in _infos(model).items():
        response = model.runtime.run(
            call_unary(model.runtime.p2p, peer, info, RPC_INFO, make_request("", [], {}), timeout=20), timeout=30
        )
        counters[peer] = unpack_metadata(response.metadata)["push"]
    return counters


def _push(model, address: str, metadata: dict, tensors) -> str:
    """One raw push to a node's direct lane; returns "ok" or the node's error text."""

    async def call():
        return await first_response(
            lambda requests: call_stream_direct(address, RPC_PUSH, requests),
            make_request("", tensors, metadata),
            peer=address,
            name=RPC_PUSH,
            timeout=10,
        )

    try:
        response = model.runtime.run(call(), timeout=20)
    except Exception as e:
        return str(e)
    return "ok" if unpack_metadata(response.metadata).get("ok") else repr(response)


def test_push_generates_the_same_tokens_as_relay_and_local(model, swarm, tiny_llama, expected):
    before = _counters(model)
    session = model.inference_session(max_length=PROMPT.shape[1] + 8)
    with session:
        pushed = model.generate(PROMPT, max_new_tokens=8, do_sample=False, session=session)
    after = _counters(model)
    assert session.pushed_steps == 8 and session.push_fallbacks == 0 and session.failovers == 0
    first, second = (span.peer_id for span in session.route)
    assert after[first]["sent"] - before[first]["sent"] == 8  # the first hop pushed every step...
    assert after[second]["received"] - before[second]["received"] == 8  # ...and the second stepped on each push

    relay = _model(swarm, tiny_llama, push=False)
    try:
        relayed = relay.generate(PROMPT, max_new_tokens=8, do_sample=False)
    finally:
        relay.shutdown()
    assert pushed.tolist() == relayed.tolist() == expected.tolist()


def test_every_pushed_step_is_paid_by_a_checked_receipt(model):
    receipts = len(model.wallet.receipts)
    model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert len(model.wallet.receipts) - receipts == 2 * 4  # one per hop per step, inputs = the pushed tensor


def test_bad_pushes_get_clear_errors_and_the_node_keeps_serving(model, expected):
    session = model.inference_session(max_length=16)
    try:
        target = session.hops[1]
        address, hidden = target.span.info.direct_address, torch.zeros(1, 1, model.config.hidden_size)
        good = {"session_id": session.session_id, "step": 50, "token": target.push_token}
        assert "unknown_session" in _push(model, address, {**good, "session_id": os.urandom(16)}, [hidden])
        assert "bad_request" in _push(model, address, {**good, "token": os.urandom(16)}, [hidden])
        assert "bad_request" in _push(model, address, {**good, "token": "not bytes"}, [hidden])
        wrong_shape = _push(model, address, good, [torch.zeros(1, 1, 3)])
        assert "bad_request" in wrong_shape and "shape" in wrong_shape
        assert "bad_request" in _push(model, address, good, [hidden.fill_(float("nan"))])
        assert "bad_request" in _push(model, address, good, [])
        unasked = torch.zeros(1, 1, model.config.hidden_size)
        assert _push(model, address, good, [unasked]) == "ok"  # a push for a step nobody waits for yet is kept
    finally:
        session.close()
    assert model.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()


def test_a_malformed_push_target_is_refused(model, expected):
    session = model.inference_session(max_length=16)
    try:
        first = session.hops[0]
        step = first.stream.step(
            [torch.zeros(1, 1, model.config.hidden_size)],
            step=0,
            position=0,
            push_to=("no port", os.urandom(16)),
            timeout=10,
        )
        with pytest.raises(Exception, match="bad_request.*HOST:PORT"):
            model.runtime.run(step, 20)
    finally:
        session.close()
    assert model.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()


def test_a_missing_push_falls_back_to_relay(model, expected):
    """The first hop is told to push to a listening port no node announces: it must not connect there (a client
    cannot aim a node at any host), so the pushes go missing and the client relays."""
    session = InferenceSession(
        model.sequence_manager,
        model.runtime,
        model.wallet,
        max_length=PROMPT.shape[1] + 8,
        config=dataclasses.replace(model.client_config, push_timeout=0.2),
    )
    second = session.hops[1]
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        stranger.settimeout(0)
        address = f"127.0.0.1:{stranger.getsockname()[1]}"
        second.span = dataclasses.replace(
            second.span, info=dataclasses.replace(second.span.info, direct_address=address)
        )
        with session:
            tokens = model.generate(PROMPT, max_new_tokens=8, do_sample=False, session=session)
        with pytest.raises(BlockingIOError):
            stranger.accept()  # nobody connected
    assert tokens.tolist() == expected.tolist()
    # after push_misses relayed steps in a row, the session stops asking for pushes
    assert session.push_fallbacks == model.client_config.push_misses == 3
    assert session.pushed_steps == 0 and session.failovers == 0


def test_first_hop_dies_mid_generation_in_push_mode(swarm, model, tiny_llama):
    """Last in this module: it kills a node."""
    prompt = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(42))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    want = reference.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
    session = model.inference_session(max_length=26)
    victim_peer = session.route[0].peer_id
    victim = next(n for n in swarm.nodes if n.address.endswith(str(victim_peer)))
    tokens = []
    for i, token in enumerate(
        model.stream_generate(prompt, max_new_tokens=20, do_sample=False, session=session, eos_token_id=[])
    ):
        tokens.append(int(token[0]))
        if i == 8:
            swarm.kill(victim)  # abrupt: no goodbye on the DHT
    session.close()
    assert session.failovers >= 1 and victim_peer not in [span.peer_id for span in session.route]
    assert session.pushed_steps >= 15  # push resumed on the new route
    assert prompt[0].tolist() + tokens == want[0].tolist()
