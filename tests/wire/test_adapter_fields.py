"""LoRA adapters on the wire: names are plain tokens wherever they travel (opens, calls, announcements), a client's
signature covers the adapter it asked for, and a receipt's compute descriptor binds the adapter's digest."""

from __future__ import annotations

import pytest
import torch
from eth_account import Account

from nectar.wire.announce import ServerInfo
from nectar.wire.fingerprints import ComputeSpec
from nectar.wire.messages import BackwardCall, ForwardCall, Open
from nectar.wire.protocol import MAX_ADAPTERS, ErrorCode, NodeRPCError, make_request, pack_metadata

BAD_NAMES = ["../style-a", "/etc/passwd", "a/b", "a\\b", "", ".x", "x" * 65, 7, b"style-a", ["style-a"]]


def test_messages_carry_the_adapter():
    x = torch.zeros(1, 2, 8)
    opening = Open.decode(Open("m[0:4]", b"s" * 16, 8, adapter="style-a").to_request())
    assert opening.adapter == "style-a"
    assert Open.decode(Open("m[0:4]", b"s" * 16, 8).to_request()).adapter is None
    assert ForwardCall.decode(ForwardCall("m[0:4]", x, adapter="style-a").to_request()).adapter == "style-a"
    assert BackwardCall.decode(BackwardCall("m[0:4]", x, x, adapter="style-a").to_request()).adapter == "style-a"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_node_refuses_anything_but_a_plain_name(name):
    metadata = {"type": "open", "session_id": b"s" * 16, "max_length": 8, "adapter": name}
    for decode, request in (
        (Open.decode, make_request("m[0:4]", [], metadata)),
        (ForwardCall.decode, make_request("m[0:4]", [torch.zeros(1, 2, 8)], {"adapter": name})),
    ):
        with pytest.raises(NodeRPCError) as error:
            decode(request)
        assert error.value.code == ErrorCode.BAD_REQUEST and "no paths" in error.value.message


def test_the_clients_signature_covers_the_adapter():
    key = Account.create()
    signed = Open("m[0:4]", b"s" * 16, 8, adapter="style-a").signed(key.key, node=key.address, peer_id="peer")
    assert signed.signer(node=key.address, peer_id="peer") == key.address
    swapped = Open.decode(Open(**{**signed.__dict__, "adapter": "style-b"}).to_request())
    assert swapped.signer(node=key.address, peer_id="peer") != key.address  # a relay cannot change the adapter
    plain = Open.decode(Open(**{**signed.__dict__, "adapter": None}).to_request())
    assert plain.signer(node=key.address, peer_id="peer") != key.address


def _info(**fields) -> dict:
    base = dict(state=2, start=0, end=4, throughput=1.0, inference_rps=1.0, forward_rps=1.0, network_rps=1.0)
    base |= dict(dtype="float32", cache_tokens_left=1, price_per_token=0, eth_address="")
    return base | fields


def test_announcements_list_only_plain_names_and_few():
    assert ServerInfo.from_dict(_info()).adapters == []
    assert ServerInfo.from_dict(_info(adapters=["style-a", "b.2"])).adapters == ["style-a", "b.2"]
    for bad in (["../x"], "style-a", [f"a{i}" for i in range(MAX_ADAPTERS + 1)], [None], {"a": 1}):
        with pytest.raises(ValueError):
            ServerInfo.from_dict(_info(adapters=bad))
    assert len(pack_metadata(ServerInfo.from_dict(_info(adapters=["x" * 64] * MAX_ADAPTERS)).to_dict())) < 2048


def test_descriptors_bind_the_adapter():
    digest = bytes(range(32))
    plain, adapted = ComputeSpec("float16"), ComputeSpec("float16", adapter=digest)
    assert len(plain.encode()) == 8 and ComputeSpec.decode(plain.encode()) == plain  # unchanged for base steps
    assert len(adapted.encode()) == 40 and ComputeSpec.decode(adapted.encode()) == adapted
    for raw in (plain.encode() + digest, adapted.encode()[:-1], adapted.encode()[:8]):
        with pytest.raises(ValueError):
            ComputeSpec.decode(raw)
    with pytest.raises(ValueError):
        ComputeSpec(adapter=b"short")
