"""Micro-benchmark: one decode step's messages, typed (wire/messages.py) against the dict code they replaced.

Per step, a client encodes a Step and decodes the node's StepReply; the node decodes the Step and encodes its reply.
Run: PYTHONPATH=.pkgroot python benchmarks/bench_messages.py [hidden_size]
"""

from __future__ import annotations

import sys
import timeit

import torch

from nectar.wire.direct import parse_address
from nectar.wire.messages import Step, StepReply, decode_inference_reply, decode_inference_request
from nectar.wire.protocol import (
    ErrorCode,
    NodeRPCError,
    make_request,
    pack_metadata,
    pack_tensors,
    unpack_metadata,
    unpack_tensors,
)

UID, SID = "model[0:12]", b"s" * 16
PADDED = SID.rjust(32, b"\0")  # the node pads session ids to 32 bytes


def _session_id(metadata):  # the handler's checks before messages.py
    session_id = metadata.get("session_id")
    if not isinstance(session_id, bytes) or not (1 <= len(session_id) <= 32):
        raise NodeRPCError(ErrorCode.BAD_REQUEST, "session_id must be 1 to 32 bytes")
    return session_id.rjust(32, b"\0")


def _int(metadata, name, low, high, default=None):
    value = metadata.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= high):
        raise NodeRPCError(ErrorCode.BAD_REQUEST, f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _push_target(metadata):
    target = metadata.get("push_to")
    if target is None:
        return None
    address, token = (target.get("address"), target.get("token")) if isinstance(target, dict) else (None, None)
    parse_address(address)
    return address, token


def dict_round_trip(x, session_id=PADDED):
    request = make_request(UID, [x], {"type": "step", "session_id": SID, "step": 7, "position": 20})  # client
    metadata = unpack_metadata(request.metadata)  # node
    kind = metadata.get("type")
    if kind in ("pay", "cancel", "flush") and _session_id(metadata) == session_id:
        raise AssertionError
    if metadata.get("type") != "step" or _session_id(metadata) != session_id:
        raise AssertionError
    tensors = unpack_tensors(request.tensors) if request.tensors else None
    _push_target(metadata)
    assert 1 <= len(tensors) <= 2
    _int(metadata, "step", 0, 2**63 - 1)
    _int(metadata, "position", 0, 20, default=20)
    packed = pack_tensors([tensors[0]])
    response = runtime_response(packed, {"receipt_follows": True, "cache_tokens_left": 1000})
    outputs, reply = unpack_tensors(response.tensors), unpack_metadata(response.metadata)  # client
    return outputs[0], reply.get("receipt_follows") is True


def typed_round_trip(x, session_id=PADDED):
    request = Step(SID, 7, position=20, hidden=x).to_request(UID)  # client
    step = decode_inference_request(request)  # node
    if step.__class__ is not Step or step.session_id != session_id:
        raise AssertionError
    packed = pack_tensors([step.hidden])
    response = StepReply(step.hidden, receipt_follows=True, cache_tokens_left=1000).to_response(packed)
    reply = decode_inference_reply(response)  # client
    return reply.output, reply.receipt_follows


def runtime_response(packed, metadata):
    from hivemind.proto import runtime_pb2

    return runtime_pb2.ExpertResponse(tensors=packed, metadata=pack_metadata(metadata))


def main():
    hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 576
    x = torch.randn(1, 1, hidden)
    assert torch.equal(dict_round_trip(x)[0], typed_round_trip(x)[0])
    for _ in range(3):
        for name, function in (("dict", dict_round_trip), ("typed", typed_round_trip)):
            best = min(timeit.repeat(lambda f=function: f(x), number=2000, repeat=7)) / 2000
            print(f"{name:>5}: {best * 1e6:6.2f} us per step (encode + decode, request and reply)")


if __name__ == "__main__":
    main()
