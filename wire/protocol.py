"""The node RPC protocol: method names, message metadata, tensor packing and the errors a node can return.

Node (``nectar.node.handler``) and client (``nectar.client``) both import this module and nothing of each other.
All calls use hivemind's ``runtime_pb2.ExpertRequest``/``ExpertResponse``: tensors in ``tensors``, everything else
in ``metadata`` (msgpack). Streams carry no size limit, so forward/backward are stream RPCs too. They travel over the
P2P daemons (``nectar.wire.transport``) or, where a node announces one, its direct TCP lane (``nectar.wire.direct``),
in the same framing. Each message below is a dataclass of ``nectar.wire.messages`` (which encodes and checks it);
``nectar.wire.stubs`` makes the typed calls.

Inference stream (``rpc_inference``), one long-lived stream per hop and session:
  request 1   metadata {"type": "open", "session_id", "max_length", "batch_size", "client", ...} (+ optional step)
  request k   metadata {"type": "step", "session_id", "step", "position", "voucher"?}
              tensors  [hidden_states [B, T, H]] (+ [prompts [n_blocks, B, P, H]] on the first step)
  response k  metadata {"receipt"?, "cache_tokens_left"} tensors [hidden_states [B, T, H]]
              (with "receipts": "separate" in the open: {"receipt_follows": true, ...}, and receipt k comes as a
              message of its own, {"type": "receipt", "step", "receipt", "fingerprint"}, before response k+1;
              with "receipts": "next", where step k+1 shares its round with other sessions, it rides in response
              k+1 instead, as {"previous_receipt": {"step", "receipt", "fingerprint"}, ...})
  also        {"type": "pay", "session_id", "voucher"}; {"type": "flush", "session_id"} (the pending receipt now)
  error       an RPC error whose text starts with one of ``ErrorCode`` (e.g. "cache_full: ...")

Push mode (``nectar.node.push``, opt-in by the client): the open may carry "push_token" (16-32 random bytes); a
step may carry "push_to": {"address": next hop's direct lane, "token": its push token}, and the next hop's step then
carries "pushed": true and no tensors. As soon as its output is computed, the sender sends it to the next hop's
``rpc_push`` (metadata {"session_id", "step", "token"}, tensors [hidden_states]; each acked with {"ok": true}), then
answers its client as usual; the next hop steps on the pushed tensor. A client that gave up on a push sends
{"type": "cancel", "session_id", "step"}; the waiting step then answers {"push_missing": true} without tensors, and
the client relays that step instead.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

# Upper bounds a node enforces before touching a tensor (clear errors, never an OOM).
MAX_BATCH_SIZE = 64
MAX_TOKENS_PER_REQUEST = 8192
MAX_METADATA_BYTES = 64 * 1024
# A LoRA adapter's name as requests and announcements carry it: a plain token, never a path (nodes look it up among
# the folders their operator listed). ``nectar.models.adapters`` keeps the same rule for folder names.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ADAPTERS = 16  # adapters one node announces (and serves)

SUPPORTED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def peer_text(text: str, limit: int = 1000) -> str:
    """``text`` a peer chose (an error's message, a record's field), cut to ``limit`` characters before it reaches
    logs, exceptions, database rows or users: a peer may send megabytes of it. An honest node's longest error (a
    payment refusal naming two addresses and the command to run) is about 520."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"  # malformed message, wrong shape or dtype: fix the request
    TOO_LARGE = "too_large"  # over the node's limits: split the request
    CACHE_FULL = "cache_full"  # not enough KV-cache memory now: try another node or later
    UNKNOWN_SESSION = "unknown_session"  # step for a session this stream did not open
    SESSION_EXPIRED = "session_expired"  # idle too long: open a new session and replay history
    CREDIT_LIMIT = "credit_limit"  # unpaid work above the node's limit: send a voucher
    WRONG_SPAN = "wrong_span"  # the node does not host the requested blocks (any more)
    FORBIDDEN = "forbidden"  # a call only registered verifiers may make, unsigned, stale, replayed or not a verifier's
    UNKNOWN_ADAPTER = "unknown_adapter"  # the node serves no adapter of that name: route to a node that lists it
    LANE_FULL = "lane_full"  # the direct lane refused the connection before reading it (its per-address cap): use P2P
    INTERNAL = "internal"


class NodeRPCError(Exception):
    """An error a node reports to one client; the text begins with the error code so clients can react."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    @staticmethod
    def code_of(error: BaseException) -> ErrorCode | None:
        text = str(error)
        for code in ErrorCode:
            if code.value + ":" in text:
                return code
        return None


def adapter_name(value: Any) -> str | None:
    """``value`` if it is None or an adapter name, else ``NodeRPCError(BAD_REQUEST)``: requests name adapters."""
    if value is None or (isinstance(value, str) and ADAPTER_NAME.match(value)):
        return value
    raise NodeRPCError(
        ErrorCode.BAD_REQUEST,
        f"adapter must be an adapter's name (1-64 letters, digits, '.', '_', '-'; no paths), got {str(value)[:80]!r}",
    )


def module_uid(model_id: str, start: int, end: int) -> str:
    """The uid a request names: which model and which blocks [start, end) of it."""
    return f"{model_id}[{start}:{end}]"


def parse_module_uid(uid: str) -> tuple[str, int, int]:
    try:
        model_id, span = uid.rsplit("[", 1)
        start, end = span.rstrip("]").split(":")
        return model_id, int(start), int(end)
    except Exception:
        raise NodeRPCError(ErrorCode.BAD_REQUEST, f"malformed module uid {uid!r}; expected 'model[start:end]'")


# Tensors travel as hivemind's uncompressed ``runtime_pb2.Tensor`` (raw little-endian bytes, shape, dtype name); these
# functions build and read it directly, in half the time of hivemind's serializer (every hop of every step packs and
# unpacks one). The bytes are the ones hivemind writes, except bfloat16: two bytes an element, not widened to
# float32; hivemind reads both, and so does ``unpack_tensor``. Compressed tensors still go through hivemind.
_NONE = runtime_pb2.CompressionType.NONE
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
NUMPY_DTYPES = {  # torch dtypes numpy holds as they are (bfloat16 it cannot)
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}  # numpy reads and writes these without a view


def pack_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    if tensor.requires_grad:  # (each step packs a few tensors: skip the calls that would change nothing)
        tensor = tensor.detach()
    if not tensor.is_cpu:
        tensor = tensor.to("cpu")
    tensor = tensor.contiguous()
    if not tensor.numel():
        buffer = b""
    elif tensor.dtype in NUMPY_DTYPES:  # the same bytes, 1.4 us faster than through a uint8 view
        buffer = tensor.numpy().tobytes()
    else:
        buffer = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return runtime_pb2.Tensor(
        compression=_NONE,
        buffer=buffer,
        size=tensor.shape,
        dtype=_DTYPE_NAMES.get(tensor.dtype) or str(tensor.dtype).removeprefix("torch."),
    )


def unpack_tensor(message: runtime_pb2.Tensor) -> torch.Tensor:
    if message.compression != _NONE:
        return deserialize_torch_tensor(message)
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"unsupported dtype {message.dtype!r}")
    shape = tuple(message.size)
    numel = math.prod(shape)
    buffer = message.buffer
    if dtype == torch.bfloat16 and numel and len(buffer) == 4 * numel:  # hivemind's legacy bfloat16: float32
        tensor = torch.frombuffer(bytearray(buffer), dtype=torch.float32).to(torch.bfloat16).reshape(shape)
    elif len(buffer) != numel * dtype.itemsize:
        raise ValueError(f"{len(buffer)} bytes cannot hold a {message.dtype} tensor of shape {list(shape)}")
    elif numel == 0:
        tensor = torch.empty(shape, dtype=dtype)
    elif dtype in NUMPY_DTYPES:  # a copy (the message's bytes are read-only), shaped by numpy: 0.5 us faster
        tensor = torch.from_numpy(np.frombuffer(bytearray(buffer), dtype=NUMPY_DTYPES[dtype]).reshape(shape))
    else:
        tensor = torch.frombuffer(bytearray(buffer), dtype=dtype).reshape(shape)
    return tensor.requires_grad_(True) if message.requires_grad else tensor


def pack_tensors(tensors: Iterable[torch.Tensor]) -> list[runtime_pb2.Tensor]:
    return [pack_tensor(t) for t in tensors]


def unpack_tensors(serialized: Sequence[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    try:
        return [unpack_tensor(t) for t in serialized]
    except Exception as e:
        raise NodeRPCError(ErrorCode.BAD_REQUEST, f"could not decode a tensor ({type(e).__name__}: {e})")


def pack_metadata(metadata: dict[str, Any]) -> bytes:
    return MSGPackSerializer.dumps(metadata)


def unpack_metadata(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    if len(raw) > MAX_METADATA_BYTES:
        raise NodeRPCError(ErrorCode.TOO_LARGE, f"metadata is {len(raw)} bytes, the limit is {MAX_METADATA_BYTES}")
    try:
        metadata = MSGPackSerializer.loads(raw)
    except Exception:
        raise NodeRPCError(ErrorCode.BAD_REQUEST, "metadata is not valid msgpack")
    if not isinstance(metadata, dict):
        raise NodeRPCError(ErrorCode.BAD_REQUEST, "metadata must be a msgpack map")
    return metadata


def make_request(uid: str, tensors: Sequence[torch.Tensor], metadata: dict[str, Any]) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid=uid, tensors=pack_tensors(tensors), metadata=pack_metadata(metadata))


def make_response(tensors: Sequence[torch.Tensor], metadata: dict[str, Any]) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(tensors=pack_tensors(tensors), metadata=pack_metadata(metadata))


# Stream handler names on the P2P daemon (every RPC is a stream: no message-size cap, one framing, clear errors).
RPC_INFO = "nectar1.info"
RPC_INFERENCE = "nectar1.inference"
RPC_FORWARD = "nectar1.forward"
RPC_BACKWARD = "nectar1.backward"
RPC_AUDIT = "nectar1.audit"
RPC_PUSH = "nectar1.push"
RPC_ADAPTER = "nectar1.adapter"  # a LoRA adapter's files by digest, for a verifier auditing a step made with it
