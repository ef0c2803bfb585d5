"""Tensors on the wire: Nectar's packing writes what hivemind's serializer writes (bfloat16 in two bytes, which
hivemind reads too), reads both back, and answers a malformed tensor with a clear error."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from nectar.wire.protocol import ErrorCode, NodeRPCError, pack_tensors, unpack_tensors

TENSORS = [
    torch.randn(1, 1, 512),
    torch.randn(2, 7, 64).half(),
    torch.randn(1, 3, 64).bfloat16(),
    torch.randn(4, 4).double(),
    torch.randint(-5, 5, (3, 5)),
    torch.randint(0, 255, (6,), dtype=torch.uint8),
    torch.rand(2, 3) > 0.5,
    torch.zeros(0, 4),
    torch.randn(3, 8)[:, ::2],  # not contiguous
]


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}{list(t.shape)}")
def test_packing_matches_hivemind_byte_for_byte_and_round_trips(tensor):
    (packed,) = pack_tensors([tensor])
    if tensor.dtype == torch.bfloat16:  # two bytes an element (hivemind 1.1's default still widens it to float32)
        assert len(packed.buffer) == 2 * tensor.numel()
        (legacy,) = unpack_tensors([serialize_torch_tensor(tensor)])
        assert torch.equal(legacy, tensor)  # and the widened form still decodes
    else:
        assert packed.SerializeToString() == serialize_torch_tensor(tensor.contiguous()).SerializeToString()
    (unpacked,) = unpack_tensors([runtime_pb2.Tensor.FromString(packed.SerializeToString())])
    assert unpacked.dtype == tensor.dtype and unpacked.shape == tensor.shape and torch.equal(unpacked, tensor)
    unpacked.add_(1) if unpacked.dtype != torch.bool else None  # writable: a copy, not the message's bytes


def test_compressed_and_legacy_messages_from_other_senders_still_decode():
    x = torch.randn(2, 3, 16)
    compressed = serialize_torch_tensor(x, runtime_pb2.CompressionType.FLOAT16)
    (decoded,) = unpack_tensors([compressed])
    assert torch.allclose(decoded, x, atol=1e-2)
    legacy = runtime_pb2.Tensor(buffer=x.numpy().tobytes(), size=x.shape, dtype="bfloat16")  # bfloat16 as float32
    (decoded,) = unpack_tensors([legacy])
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, x.bfloat16())


@pytest.mark.parametrize(
    "message, complaint",
    [
        (runtime_pb2.Tensor(buffer=b"\0" * 10, size=[1, 4], dtype="float32"), "10 bytes cannot hold"),
        (runtime_pb2.Tensor(buffer=b"\0" * 16, size=[2, 2], dtype="complex32"), "unsupported dtype"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[2], dtype="int32", requires_grad=True), "gradients"),
    ],
)
def test_a_malformed_tensor_is_a_bad_request(message, complaint):
    with pytest.raises(NodeRPCError) as error:
        unpack_tensors([message])
    assert error.value.code == ErrorCode.BAD_REQUEST and complaint in str(error.value)
