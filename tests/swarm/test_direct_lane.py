"""The direct TCP lane: same results as P2P, bad bytes get a clear error, a dead lane falls back to P2P."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils import MSGPackSerializer
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.node.local_swarm import LocalSwarm
from nectar.wire import stubs as streams
from nectar.wire.direct import parse_address
from nectar.wire.protocol import RPC_INFO, make_request, unpack_metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm"), direct=True) as swarm:
        swarm.add_node(tiny_llama, blocks=(0, 2), name="first", extra_args=["--throughput", "100"])
        swarm.add_node(tiny_llama, blocks=(2, 4), name="second", extra_args=["--throughput", "100"])
        swarm.wait_for_blocks(tiny_llama, 4)
        yield swarm


def _spans(model):
    servers = model.sequence_manager.servers()
    return {peer: info for block in servers.values() for peer, info in block.items()}


def _frames(address: str, payload: bytes) -> tuple[bytes, bytes]:
    """Sends raw bytes to a direct lane; returns (marker, message) of the node's first frame."""
    with socket.create_connection(parse_address(address), timeout=10) as sock:
        sock.sendall(payload)
        reader = sock.makefile("rb")
        marker = reader.read(1)
        size = int.from_bytes(reader.read(P2P.HEADER_LEN), P2P.BYTEORDER)
        return marker, reader.read(size)


def _hello(name: str) -> bytes:
    data = MSGPackSerializer.dumps({"rpc": name})
    return len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data


def test_nodes_announce_a_loopback_lane(model):
    infos = _spans(model)
    assert len(infos) == 2
    for info in infos.values():
        host, port = parse_address(info.direct_address)
        assert host == "127.0.0.1" and port > 0


def test_generation_over_the_lane_matches_p2p_and_local(model, swarm, tiny_llama, monkeypatch):
    opened = []
    original = streams.call_stream_direct

    async def counting(address, name, requests):
        opened.append((address, name))
        return await original(address, name, requests)

    monkeypatch.setattr(streams, "call_stream_direct", counting)
    input_ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    over_lane = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    lanes = {address for address, name in opened if name == "nectar1.inference"}
    assert lanes == {info.direct_address for info in _spans(model).values()}  # both hops went direct

    p2p_only = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, direct=False)
    )
    try:
        opened.clear()
        over_p2p = p2p_only.generate(input_ids, max_new_tokens=8, do_sample=False)
        assert opened == []
    finally:
        p2p_only.shutdown()
    local = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    expected = local.generate(input_ids, max_new_tokens=8, do_sample=False)
    assert over_lane.tolist() == over_p2p.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"\xff" * 64, "bad_request"),  # a hello frame "longer than" the limit
        (_hello("nectar1.nonexistent"), "unknown RPC"),
        ((3).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + b"abc", "bad_request"),  # not msgpack / not a map
    ],
)
def test_bad_bytes_get_a_clear_error_and_the_node_keeps_serving(model, payload, expected):
    address = next(iter(_spans(model).values())).direct_address
    marker, message = _frames(address, payload)
    assert marker == P2P.ERROR_MARKER
    error = RPCError()
    error.ParseFromString(message)
    assert expected in error.message
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_garbage_after_the_hello_ends_only_that_stream(model):
    address = next(iter(_spans(model).values())).direct_address
    marker, message = _frames(address, _hello("nectar1.inference") + b"\x07" + b"\x00" * 16)
    assert marker == P2P.ERROR_MARKER
    error = RPCError()
    error.ParseFromString(message)
    assert "bad_request" in error.message
    assert model.generate(torch.tensor([[4, 5]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


def test_unreachable_lane_falls_back_to_p2p(model):
    peer, info = next(iter(_spans(model).items()))
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    broken = dataclasses.replace(info, direct_address=dead)
    response = model.runtime.run(
        streams.call_unary(model.runtime.p2p, peer, broken, RPC_INFO, make_request("", [], {}), timeout=20), timeout=30
    )
    assert isinstance(response, runtime_pb2.ExpertResponse)
    assert unpack_metadata(response.metadata)["eth_address"] == info.eth_address
