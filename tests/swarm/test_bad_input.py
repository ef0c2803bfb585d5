"""Bad input never hurts a node: every malformed request gets a clear error and the node keeps serving others."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from eth_account import Account
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from nectar.node.local_swarm import LocalSwarm
from nectar.wire.messages import ClientAuth
from nectar.wire.protocol import (
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    make_request,
    unpack_metadata,
)
from nectar.wire.transport import call_once, call_stream

pytestmark = pytest.mark.slow
HIDDEN = 64


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.add_node(
            tiny_llama,
            blocks=(0, 4),
            name="solo",
            extra_args=["--throughput", "100", "--session-timeout", "3", "--cache-mb", "1"],
        )
        swarm.wait_for_blocks(tiny_llama, 4)
        yield swarm


@pytest.fixture(scope="module")
def peer(swarm) -> PeerID:
    NODE["eth"] = swarm.nodes[0].eth_address
    return PeerID.from_base58(swarm.nodes[0].address.rsplit("/", 1)[-1])


NODE: dict = {}  # the node's receipt address (set by ``peer``): requests are signed for it
CLIENT = Account.create()


def _signed(kind: str, uid: str, metadata: dict, peer) -> dict:
    """``metadata`` with a client signature for the node (issue 22: nodes serve signed opens and calls only), so
    these tests reach the checks they are about."""
    session = metadata.get("session_id") if isinstance(metadata.get("session_id"), bytes) else None
    auth = ClientAuth.sign(
        CLIENT.key, kind=kind, uid=uid, session_id=session, step=0, node=NODE["eth"], peer_id=str(peer)
    )
    return {**metadata, "client": CLIENT.address, "auth": auth.to_wire()}


def _open(peer, metadata: dict, uid: str = "tiny-llama[0:4]"):
    return make_request(uid, [], _signed("open", uid, {"type": "open", **metadata}, peer))


def _error_of(model, coro) -> str:
    with pytest.raises(Exception) as info:
        model.runtime.run(coro, timeout=30)
    return str(info.value)


def _forward(model, peer, tensors, uid="tiny-llama[0:4]", metadata=None):
    request = make_request(uid, tensors, _signed(RPC_FORWARD, uid, metadata or {}, peer))
    return call_once(model.runtime.p2p, peer, RPC_FORWARD, request, timeout=20)


async def _inference(model, peer, messages, *, pause: float = 0.0):
    async def requests():
        for message in messages:
            yield message
            await asyncio.sleep(pause)

    replies = []
    async for response in await call_stream(model.runtime.p2p, peer, RPC_INFERENCE, requests()):
        replies.append(response)
    return replies


def _still_serves(model):
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.parametrize(
    "tensors, code, words",
    [
        ([torch.randn(1, 3, HIDDEN + 1)], "bad_request", "shape"),
        ([torch.randn(3, HIDDEN)], "bad_request", "shape"),
        ([torch.randint(0, 5, (1, 3, HIDDEN))], "bad_request", "floating-point"),
        ([torch.full((1, 2, HIDDEN), float("nan"))], "bad_request", "NaN"),
        ([torch.randn(65, 1, HIDDEN)], "too_large", "limits"),
        ([torch.randn(1, 8193, HIDDEN)], "too_large", "split"),
        ([torch.randn(1, 3, HIDDEN), torch.randn(1, 1, 3, HIDDEN)], "bad_request", "prompts must have shape"),
        ([], "bad_request", "hidden_states"),
    ],
)
def test_malformed_forward_gets_clear_error(model, peer, tensors, code, words):
    text = _error_of(model, _forward(model, peer, tensors))
    assert code in text and words in text
    _still_serves(model)


def test_wrong_span_and_garbage_uid(model, peer):
    assert "wrong_span" in _error_of(model, _forward(model, peer, [torch.randn(1, 2, HIDDEN)], uid="tiny-llama[2:9]"))
    assert "wrong_span" in _error_of(model, _forward(model, peer, [torch.randn(1, 2, HIDDEN)], uid="other[0:4]"))
    assert "malformed module uid" in _error_of(model, _forward(model, peer, [torch.randn(1, 2, HIDDEN)], uid="???"))
    _still_serves(model)


def test_backward_shape_mismatch(model, peer):
    uid = "tiny-llama[0:4]"
    request = make_request(
        uid, [torch.randn(1, 3, HIDDEN), torch.randn(1, 4, HIDDEN)], _signed(RPC_BACKWARD, uid, {}, peer)
    )
    text = _error_of(model, call_once(model.runtime.p2p, peer, RPC_BACKWARD, request, timeout=20))
    assert "bad_request" in text and "grad_outputs" in text


def test_unknown_session(model, peer):
    step = make_request(
        "tiny-llama[0:4]",
        [torch.randn(1, 1, HIDDEN)],
        {"type": "step", "session_id": b"never-opened", "step": 0, "position": 0},
    )
    assert "unknown_session" in _error_of(model, _inference(model, peer, [step]))
    opened = _open(peer, {"session_id": b"s1", "max_length": 8})
    other = make_request(
        "tiny-llama[0:4]", [torch.randn(1, 1, HIDDEN)], {"type": "step", "session_id": b"s2", "step": 0, "position": 0}
    )
    assert "unknown_session" in _error_of(model, _inference(model, peer, [opened, other]))
    _still_serves(model)


def test_session_expires_when_idle(model, peer):
    opened = _open(peer, {"session_id": b"idle", "max_length": 8})
    step = make_request(
        "tiny-llama[0:4]",
        [torch.randn(1, 1, HIDDEN)],
        {"type": "step", "session_id": b"idle", "step": 0, "position": 0},
    )
    text = _error_of(model, _inference(model, peer, [opened, step], pause=4.5))
    assert "session_expired" in text and "replay" in text
    _still_serves(model)


def test_cache_full_and_position_checks(model, peer):
    # 1 MiB budget; 8192 tokens x 64 sequences cannot fit
    huge = _open(peer, {"session_id": b"big", "max_length": 8192, "batch_size": 64})
    text = _error_of(model, _inference(model, peer, [huge]))
    assert "cache_full" in text and "MiB" in text

    def opened():  # a fresh signature per stream: a node refuses a replayed one
        return _open(peer, {"session_id": b"pos", "max_length": 4})

    too_far = make_request(
        "tiny-llama[0:4]", [torch.randn(1, 5, HIDDEN)], {"type": "step", "session_id": b"pos", "step": 0, "position": 0}
    )
    assert "max_length" in _error_of(model, _inference(model, peer, [opened(), too_far]))
    gap = make_request(
        "tiny-llama[0:4]", [torch.randn(1, 1, HIDDEN)], {"type": "step", "session_id": b"pos", "step": 0, "position": 3}
    )
    assert "position" in _error_of(model, _inference(model, peer, [opened(), gap]))
    _still_serves(model)


def test_garbage_bytes_get_an_error(model, peer):
    async def send_garbage():
        _, reader, writer = await model.runtime.p2p.call_binary_stream_handler(peer, RPC_INFERENCE)
        writer.write(b"\x07this is not a protobuf message at all" * 10)
        await writer.drain()
        response, error = await asyncio.wait_for(P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader), 10)
        writer.close()
        return error.message if error is not None else None

    message = model.runtime.run(send_garbage(), timeout=30)
    assert message is not None and "bad_request" in message and "unreadable" in message

    async def send_bad_metadata():
        request = runtime_pb2.ExpertRequest(uid="tiny-llama[0:4]", metadata=b"\xc1\xc1 not msgpack")
        return await _inference(model, peer, [request])

    assert "metadata" in _error_of(model, send_bad_metadata())
    _still_serves(model)


def test_concurrent_clients_are_isolated_from_a_bad_one(model, peer, tiny_llama, swarm):
    """A client spamming bad requests does not disturb a good client's generation."""
    import threading

    errors = []

    def spam():
        for _ in range(20):
            try:
                model.runtime.run(_forward(model, peer, [torch.randn(1, 2, HIDDEN + 3)]), timeout=20)
            except Exception as e:
                errors.append(str(e))

    thread = threading.Thread(target=spam)
    thread.start()
    for _ in range(3):
        _still_serves(model)
    thread.join()
    assert len(errors) == 20 and all("bad_request" in e for e in errors)


def test_a_caller_that_reads_until_the_node_closes_gets_the_close(model, peer):
    """The node closes after its caller, but a caller that ends its requests and then reads until the node closes
    (hivemind's way of reading a stream to its end) gets every answer and the close within ``CALLER_LINGER``, not
    after ``CALLER_CLOSE_TIMEOUT``."""
    from nectar.wire.transport import CALLER_CLOSE_TIMEOUT, CALLER_LINGER

    opened = _open(peer, {"session_id": b"read-to-end", "max_length": 8})
    began = time.monotonic()
    replies = model.runtime.run(_inference(model, peer, [opened]), timeout=30)
    elapsed = time.monotonic() - began
    assert [unpack_metadata(reply.metadata)["type"] for reply in replies] == ["opened"]
    assert elapsed < min(CALLER_CLOSE_TIMEOUT, CALLER_LINGER + 5), elapsed


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_no_answer_is_lost_when_the_node_ends_a_stream(model, peer):
    """Every one of 2000 calls gets its answer (half errors, half outputs) while other processes load the CPU.

    A node that closed its side of a P2P stream before the caller made its daemon reset the stream, and the reset
    sometimes discarded an answer the caller's daemon had not passed on yet: 1-4 answers per 1000 calls came back as
    "closed without answering" on 2 cores. The node now closes after the caller."""
    import multiprocessing

    calls, parallel = 2000, 8
    hogs = [multiprocessing.get_context("spawn").Process(target=_spin, args=(60.0,), daemon=True) for _ in range(3)]
    for hog in hogs:
        hog.start()

    async def call(index: int, limit: asyncio.Semaphore) -> str:
        width = HIDDEN + (index % 2)  # odd calls are malformed
        async with limit:
            try:
                await _forward(model, peer, [torch.randn(1, 3, width)])
                return "output" if width == HIDDEN else "unexpected output"
            except Exception as e:
                return "bad_request" if "bad_request" in str(e) and width != HIDDEN else str(e)

    async def run_all():
        limit = asyncio.Semaphore(parallel)
        return await asyncio.gather(*(call(index, limit) for index in range(calls)))

    try:
        outcomes = model.runtime.run(run_all(), timeout=300)
    finally:
        for hog in hogs:
            hog.terminate()
    lost = [outcome for outcome in outcomes if outcome not in ("output", "bad_request")]
    assert not lost, f"{len(lost)} of {calls} calls: {lost[:3]}"
    assert outcomes.count("output") == outcomes.count("bad_request") == calls // 2
