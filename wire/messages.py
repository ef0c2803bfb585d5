"""The node RPC protocol's messages, one frozen dataclass each (the wire layout is in ``nectar.wire.protocol``).

Requests have ``to_request()`` (the exact metadata and tensors clients have always sent) and a ``decode(request)``
that checks everything that needs no backend (types, ranges, tensor counts) and raises ``NodeRPCError`` with the
``ErrorCode`` the node answers; a decoded ``session_id`` is padded to 32 bytes, as receipts carry it. Checks that
need the node (span, hidden size, cache length, credit) stay in ``nectar.node.steps``.

Replies have ``to_response()`` and a lenient ``decode(response)``: a client judges a reply itself (receipt checks,
output shapes), so a reply decodes whatever an older or odd node sends where the client used to tolerate it.

Stream messages (``Step``, ``Pay``, ``Flush``, ``Cancel``) take the stream's uid in ``to_request(uid)``: the node
reads the uid of the open only. Decoding is on the per-step path, so these are plain slotted dataclasses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

import torch
from hivemind.proto import runtime_pb2

from nectar.wire import receipts as schema
from nectar.wire.direct import parse_address
from nectar.wire.protocol import (
    MAX_BATCH_SIZE,
    MAX_TOKENS_PER_REQUEST,
    RPC_ADAPTER,
    RPC_AUDIT,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFO,
    RPC_PUSH,
    ErrorCode,
    NodeRPCError,
    adapter_name,
    pack_metadata,
    pack_tensors,
    unpack_metadata,
    unpack_tensors,
)

MAX_STEP = 2**63 - 1
ZERO_ADDRESS = "0x" + "00" * 20
_MISSING = object()

Packed = Sequence[runtime_pb2.Tensor]  # tensors already packed (a node packs an output once for push and reply)


def message(cls):
    """``@dataclass(frozen=True)`` with a faster ``__init__``: the generated frozen one sets each field through
    ``object.__setattr__`` (2 us for a ``Step``, more than all the checks of its decode), this one writes the
    instance's ``__dict__`` (0.5 us). Instances stay frozen: assigning a field raises ``FrozenInstanceError``."""
    cls = dataclass(frozen=True)(cls)
    params, lines, namespace = [], [], {}
    for field in fields(cls):
        if field.default is MISSING:
            params.append(field.name)
        else:
            namespace[f"_default_{field.name}"] = field.default
            params.append(f"{field.name}=_default_{field.name}")
        lines.append(f"    _values[{field.name!r}] = {field.name}\n")
    exec(f"def __init__(self, {', '.join(params)}):\n    _values = self.__dict__\n{''.join(lines)}", namespace)
    cls.__init__ = namespace["__init__"]
    return cls


# ---- field checks (each raises the error the node answers) --------------------------------------------------------


def _bad(message: str) -> NodeRPCError:
    return NodeRPCError(ErrorCode.BAD_REQUEST, message)


def _session_id(metadata: dict) -> bytes:
    session_id = metadata.get("session_id")
    if not isinstance(session_id, bytes) or not (1 <= len(session_id) <= 32):
        raise _bad("session_id must be 1 to 32 bytes")
    return session_id.rjust(32, b"\0")


def _int(metadata: dict, name: str, low: int, high: int, default: Any = None) -> int:
    value = metadata.get(name, default)
    if value.__class__ is not int or not (low <= value <= high):  # a bool is no integer here
        raise _bad(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _client(metadata: dict) -> str:
    client = metadata.get("client", ZERO_ADDRESS)
    try:
        return schema.checksum_address(client, "client")
    except ValueError:
        raise _bad(f"client must be an Ethereum address, got {client!r}")


def _push_token(metadata: dict) -> bytes | None:
    token = metadata.get("push_token")
    if token is not None and (not isinstance(token, bytes) or not 16 <= len(token) <= 32):
        raise _bad("push_token must be 16 to 32 random bytes")
    return token


def _tensors(request: runtime_pb2.ExpertRequest) -> list[torch.Tensor]:
    return unpack_tensors(request.tensors) if request.tensors else []


def _put(metadata: dict, name: str, value: Any) -> None:
    if value is not None:
        metadata[name] = value


# ---- client authentication ----------------------------------------------------------------------------------------

CLIENT_AUTH_MAX_SKEW_S = 300  # a signed open or call may be dated this far off the node's clock (then it is stale)


def client_auth_digest(
    *,
    kind: str,
    uid: str,
    session_id: bytes,
    step: int,
    node: str,
    peer_id: str,
    timestamp: int,
    nonce: bytes,
    adapter: str | None = None,
) -> bytes:
    """What a client signs with its paying key to open a session or make a billed forward/backward call (issue 22):
    the node (address and peer id: no replay at another node), what is asked (kind, module, session, step) and a
    timestamp and nonce (no replay later: the node keeps nonces for ``CLIENT_AUTH_MAX_SKEW_S``). The node bills the
    address that signed this, never the one a message names."""
    text = "|".join(
        [
            "nectar-client-v1",
            f"kind={kind}",
            f"node={str(node).lower()}",
            f"peer={peer_id}",
            f"uid={uid}",
            f"session=0x{bytes(session_id or b'').rjust(32, bytes(1)).hex()}",
            f"step={int(step or 0)}",
            f"timestamp={int(timestamp)}",
            f"nonce=0x{bytes(nonce).hex()}",
        ]
        + ([f"adapter={adapter}"] if adapter is not None else [])  # what is computed: no relay swaps the adapter
    )
    return schema.keccak256(text.encode())


@message
class ClientAuth:
    """{"t": timestamp, "n": 16-32 byte nonce, "s": 65-byte signature} over ``client_auth_digest``."""

    timestamp: int
    nonce: bytes
    signature: bytes

    def to_wire(self) -> dict:
        return {"t": self.timestamp, "n": self.nonce, "s": self.signature}

    @classmethod
    def decode(cls, metadata: dict) -> ClientAuth | None:
        auth = metadata.get("auth")
        if auth is None:
            return None
        if not isinstance(auth, dict):
            raise _bad("auth must be {'t': timestamp, 'n': nonce, 's': signature}")
        timestamp, nonce, signature = auth.get("t"), auth.get("n"), auth.get("s")
        if timestamp.__class__ is not int or not 0 <= timestamp < 2**63:
            raise _bad("auth.t must be a unix timestamp")
        if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 32:
            raise _bad("auth.n must be a random nonce of 16 to 32 bytes")
        if not isinstance(signature, bytes) or len(signature) != 65:
            raise _bad("auth.s must be a 65-byte signature")
        return cls(timestamp, nonce, signature)

    @classmethod
    def sign(
        cls,
        private_key: bytes | str,
        *,
        kind: str,
        uid: str,
        session_id: bytes | None,
        step: int | None,
        node: str,
        peer_id: str,
        timestamp: int | None = None,
        adapter: str | None = None,
    ) -> ClientAuth:
        import os
        import time

        from nectar.wire.eip712 import sign_digest

        timestamp = int(time.time()) if timestamp is None else int(timestamp)
        nonce = os.urandom(16)
        digest = client_auth_digest(
            kind=kind,
            uid=uid,
            session_id=session_id,
            step=step,
            node=node,
            peer_id=str(peer_id),
            timestamp=timestamp,
            nonce=nonce,
            adapter=adapter,
        )
        return cls(timestamp, nonce, sign_digest(digest, private_key))

    def signer(
        self,
        *,
        kind: str,
        uid: str,
        session_id: bytes | None,
        step: int | None,
        node: str,
        peer_id: str,
        adapter: str | None = None,
    ) -> str:
        """The address that signed this for ``node`` at ``peer_id`` (raises ``InvalidSignature``)."""
        from nectar.wire.eip712 import recover_digest_signer

        digest = client_auth_digest(
            kind=kind,
            uid=uid,
            session_id=session_id,
            step=step,
            node=node,
            peer_id=str(peer_id),
            timestamp=self.timestamp,
            nonce=self.nonce,
            adapter=adapter,
        )
        return recover_digest_signer(digest, self.signature)


# ---- inference stream: requests -----------------------------------------------------------------------------------


@message
class PushTarget:
    """Where a step's output goes too: the next hop's direct lane and the push token of its session there."""

    address: str
    token: bytes

    def to_wire(self) -> dict:
        return {"address": self.address, "token": self.token}

    @classmethod
    def decode(cls, target: Any) -> PushTarget:
        address, token = (target.get("address"), target.get("token")) if isinstance(target, dict) else (None, None)
        try:
            parse_address(address)
        except (ValueError, AttributeError):
            raise _bad(f"push_to.address must be HOST:PORT, got {address!r}")
        if not isinstance(token, bytes):
            raise _bad("push_to.token must be the next hop's push token (bytes)")
        return cls(address, token)


@message
class Step:
    """{"type": "step", "session_id", "step", "position"?, "voucher"?, "push_to"?, "pushed"?}, tensors [hidden
    [B, T, H]] (+ [prompts [n_blocks, B, P, H]] on the first step), or none with ``pushed`` (the input comes by push).

    :param position: where the tokens go in the cache; None: after the last step's (the node's cache length)
    :param voucher: a signed voucher (JSON), verified by the node's credit ledger once the step's output is out
    """

    session_id: bytes
    step: int
    position: int | None = None
    hidden: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    voucher: dict | None = None
    push_to: PushTarget | None = None
    pushed: bool = False

    TYPE: ClassVar[str] = "step"

    def metadata(self) -> dict:
        return self._add_fields({"type": "step", "session_id": self.session_id, "step": self.step})

    def _add_fields(self, metadata: dict) -> dict:
        if self.position is not None:
            metadata["position"] = self.position
        if self.voucher is not None:
            metadata["voucher"] = self.voucher
        if self.push_to is not None:
            metadata["push_to"] = self.push_to.to_wire()
        if self.pushed:
            metadata["pushed"] = True
        return metadata

    def tensors(self) -> list[torch.Tensor]:
        if self.hidden is None:
            return []
        return [self.hidden] if self.prompts is None else [self.hidden, self.prompts]

    def to_request(self, uid: str = "") -> runtime_pb2.ExpertRequest:
        metadata = {"type": "step", "session_id": self.session_id, "step": self.step}
        if self.position is not None:
            metadata["position"] = self.position
        if self.voucher is not None or self.push_to is not None or self.pushed:
            self._add_fields(metadata)
        hidden, prompts = self.hidden, self.prompts
        tensors = () if hidden is None else (hidden,) if prompts is None else (hidden, prompts)
        return runtime_pb2.ExpertRequest(uid=uid, tensors=pack_tensors(tensors), metadata=pack_metadata(metadata))

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest, metadata: dict | None = None) -> Step:
        if metadata is None:
            metadata = unpack_metadata(request.metadata)
        return cls._from(request, metadata, _session_id(metadata))

    @classmethod
    def _from(cls, request: runtime_pb2.ExpertRequest, metadata: dict, session_id: bytes) -> Step:
        step, position = metadata.get("step"), metadata.get("position")  # checked inline: this is per step
        if step.__class__ is not int or not 0 <= step <= MAX_STEP:
            _int(metadata, "step", 0, MAX_STEP)
        if position is not None and (position.__class__ is not int or not 0 <= position <= MAX_STEP):
            _int(metadata, "position", 0, MAX_STEP)
        target = metadata.get("push_to")
        push_to = PushTarget.decode(target) if target is not None else None
        pushed = metadata.get("pushed") is True
        hidden = prompts = None
        packed = request.tensors
        if packed:
            tensors = unpack_tensors(packed)
            if not 1 <= len(tensors) <= 2:
                raise _bad("a step carries hidden_states and optionally prompts")
            hidden = tensors[0]
            if len(tensors) == 2:
                prompts = tensors[1]
        elif not pushed:
            raise _bad("a step carries hidden_states (or says 'pushed': true and comes after a push_token open)")
        return cls(session_id, step, position, hidden, prompts, metadata.get("voucher"), push_to, pushed)


@message
class Open:
    """The first request of an inference stream: {"type": "open", "session_id", "max_length", "batch_size",
    "client", "receipts"?, "push_token"?} (+ a first step's fields and tensors in the same message).

    :param separate_receipts: each step's receipt comes as a message of its own (``ReceiptMessage``), signed while
        the session's next step computes or once the stream goes quiet
    :param receipts_ride: with ``separate_receipts`` ("receipts": "next"): where the session's next step shares its
        round with other sessions, the receipt rides in that step's answer (``StepReply.previous``) instead of a
        message of its own; a node serving many sessions then sends one message a step instead of two
    :param push_token: 16-32 random bytes; the hop before this one shows it to push inputs here
    :param adapter: the LoRA adapter (a name the node announces) the session's steps are computed with; None: none
    """

    uid: str
    session_id: bytes
    max_length: int
    batch_size: int = 1
    client: str = ZERO_ADDRESS
    separate_receipts: bool = False
    push_token: bytes | None = None
    first_step: Step | None = None
    auth: ClientAuth | None = None  # the client's signature (``signed``): the node bills its signer
    adapter: str | None = None
    receipts_ride: bool = False

    def signed(self, private_key: bytes | str, *, node: str, peer_id: str, timestamp: int | None = None) -> Open:
        """This open signed with the client's paying key for the node ``node`` (its receipt address) at
        ``peer_id``; ``client`` becomes the key's address."""
        from nectar.wire.eip712 import address_of

        auth = ClientAuth.sign(
            private_key,
            kind="open",
            uid=self.uid,
            session_id=self.session_id,
            step=0,
            node=node,
            peer_id=peer_id,
            timestamp=timestamp,
            adapter=self.adapter,
        )
        return Open(
            self.uid,
            self.session_id,
            self.max_length,
            self.batch_size,
            address_of(private_key),
            self.separate_receipts,
            self.push_token,
            self.first_step,
            auth,
            self.adapter,
            self.receipts_ride,
        )

    def signer(self, *, node: str, peer_id: str) -> str:
        return self.auth.signer(
            kind="open",
            uid=self.uid,
            session_id=self.session_id,
            step=0,
            node=node,
            peer_id=peer_id,
            adapter=self.adapter,
        )

    def metadata(self) -> dict:
        metadata = {
            "type": "open",
            "session_id": self.session_id,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "client": self.client,
        }
        if self.separate_receipts:
            metadata["receipts"] = "next" if self.receipts_ride else "separate"
        _put(metadata, "push_token", self.push_token)
        _put(metadata, "adapter", self.adapter)
        if self.auth is not None:
            metadata["auth"] = self.auth.to_wire()
        if self.first_step is not None:
            metadata["step"] = self.first_step.step
            self.first_step._add_fields(metadata)
        return metadata

    def to_request(self) -> runtime_pb2.ExpertRequest:
        tensors = self.first_step.tensors() if self.first_step is not None else []
        return runtime_pb2.ExpertRequest(
            uid=self.uid, tensors=pack_tensors(tensors), metadata=pack_metadata(self.metadata())
        )

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest) -> Open:
        metadata = unpack_metadata(request.metadata)
        if metadata.get("type") != "open":
            raise NodeRPCError(
                ErrorCode.UNKNOWN_SESSION,
                "this stream has no open session; send {'type': 'open', ...} first (sessions live in one stream)",
            )
        session_id = _session_id(metadata)
        batch_size = _int(metadata, "batch_size", 1, MAX_BATCH_SIZE, default=1)
        max_length = _int(metadata, "max_length", 1, MAX_TOKENS_PER_REQUEST)
        client = _client(metadata)
        token = _push_token(metadata)
        first = None
        if request.tensors or metadata.get("pushed") is True:  # the open carries its session's first step
            first = Step._from(request, metadata, session_id)
        receipts = metadata.get("receipts")
        return cls(
            request.uid,
            session_id,
            max_length,
            batch_size,
            client,
            receipts in ("separate", "next"),
            token,
            first,
            ClientAuth.decode(metadata),
            adapter_name(metadata.get("adapter")),
            receipts == "next",
        )


@message
class Pay:
    """{"type": "pay", "session_id", "voucher"}: the client's last voucher before it leaves."""

    session_id: bytes
    voucher: dict | None = None

    TYPE: ClassVar[str] = "pay"

    def to_request(self, uid: str = "") -> runtime_pb2.ExpertRequest:
        metadata = {"type": "pay", "session_id": self.session_id}
        _put(metadata, "voucher", self.voucher)
        return runtime_pb2.ExpertRequest(uid=uid, metadata=pack_metadata(metadata))

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest, metadata: dict | None = None) -> Pay:
        metadata = unpack_metadata(request.metadata) if metadata is None else metadata
        return cls(_session_id(metadata), metadata.get("voucher"))


@message
class Flush:
    """{"type": "flush", "session_id"}: send the last step's receipt now (the client waits for it)."""

    session_id: bytes

    TYPE: ClassVar[str] = "flush"

    def to_request(self, uid: str = "") -> runtime_pb2.ExpertRequest:
        return runtime_pb2.ExpertRequest(
            uid=uid, metadata=pack_metadata({"type": "flush", "session_id": self.session_id})
        )

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest, metadata: dict | None = None) -> Flush:
        metadata = unpack_metadata(request.metadata) if metadata is None else metadata
        return cls(_session_id(metadata))


@message
class Cancel:
    """{"type": "cancel", "session_id", "step"}: stop waiting for this step's push; the client relays the step."""

    session_id: bytes
    step: Any  # checked against the waiting step by the node; any other value is "not a cancel of this step"

    TYPE: ClassVar[str] = "cancel"

    def to_request(self, uid: str = "") -> runtime_pb2.ExpertRequest:
        return runtime_pb2.ExpertRequest(
            uid=uid, metadata=pack_metadata({"type": "cancel", "session_id": self.session_id, "step": self.step})
        )

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest, metadata: dict | None = None) -> Cancel:
        metadata = unpack_metadata(request.metadata) if metadata is None else metadata
        return cls(_session_id(metadata), metadata.get("step"))


InferenceRequest = Step | Pay | Flush | Cancel
_STREAM_REQUESTS = {cls.TYPE: cls for cls in (Step, Pay, Flush, Cancel)}


def decode_inference_request(request: runtime_pb2.ExpertRequest) -> InferenceRequest:
    """A request after the open on an inference stream. A message of another type (a second open, say) belongs to
    no session this stream serves: ``unknown_session``."""
    metadata = unpack_metadata(request.metadata)
    kind = metadata.get("type")
    if kind == "step":  # the per-step path first
        return Step._from(request, metadata, _session_id(metadata))
    cls = _STREAM_REQUESTS.get(kind) if kind.__class__ is str else None
    if cls is None:
        raise NodeRPCError(
            ErrorCode.UNKNOWN_SESSION,
            f"a {kind!r} message names session {metadata.get('session_id')!r}, this stream serves another",
        )
    return cls.decode(request, metadata)


# ---- inference stream: replies ------------------------------------------------------------------------------------


@message
class Opened:
    """{"type": "opened", "cache_tokens_left", "session_nonce"}: the answer to an open without a first step.

    :param session_nonce: 32 random bytes the node drew for this session: its receipts carry
        ``bind_session(session_id, session_nonce)`` (``nectar.wire.receipts``), which the client checks
    """

    cache_tokens_left: int | None = None
    session_nonce: bytes | None = None

    def to_response(self) -> runtime_pb2.ExpertResponse:
        metadata = {"type": "opened", "cache_tokens_left": self.cache_tokens_left}
        _put(metadata, "session_nonce", self.session_nonce)
        return runtime_pb2.ExpertResponse(metadata=pack_metadata(metadata))

    @classmethod
    def _from(cls, metadata: dict, tensors: list) -> Opened:
        return cls(metadata.get("cache_tokens_left"), metadata.get("session_nonce"))


@message
class StepReply:
    """A step's output: tensors [output [B, T, H]], metadata {"receipt", "fingerprint", "cache_tokens_left"}, or
    with separate receipts {"receipt_follows": true, "cache_tokens_left"} (a ``ReceiptMessage`` comes later). The
    answer to an open that carried its first step also has the session's ``session_nonce`` (as ``Opened``). With
    riding receipts (``Open.receipts_ride``) it may carry the session's previous step's receipt too,
    {"previous_receipt": {"step", "receipt", "fingerprint"}} (``previous``), which then comes in no message of its
    own."""

    output: torch.Tensor
    receipt: dict | None = None
    fingerprint: bytes | None = None
    receipt_follows: bool = False
    cache_tokens_left: int | None = None
    session_nonce: bytes | None = None
    previous: ReceiptMessage | None = None

    def to_response(self, packed: Packed | None = None) -> runtime_pb2.ExpertResponse:
        """``packed``: the output, packed already (it is not packed again)."""
        if self.receipt_follows:
            metadata = {"receipt_follows": True}
        else:
            metadata = {}
            _put(metadata, "receipt", self.receipt)
            _put(metadata, "fingerprint", self.fingerprint)
        metadata["cache_tokens_left"] = self.cache_tokens_left
        if self.session_nonce is not None:
            metadata["session_nonce"] = self.session_nonce
        if self.previous is not None:
            metadata["previous_receipt"] = self.previous.fields()
        return runtime_pb2.ExpertResponse(
            tensors=packed if packed is not None else pack_tensors([self.output]), metadata=pack_metadata(metadata)
        )

    @classmethod
    def _from(cls, metadata: dict, tensors: list) -> StepReply:
        if len(tensors) != 1:
            raise ValueError(f"a step's answer carries one output tensor, this one {len(tensors)}")
        return cls(
            tensors[0],
            metadata.get("receipt"),
            metadata.get("fingerprint"),
            metadata.get("receipt_follows") is True,
            metadata.get("cache_tokens_left"),
            metadata.get("session_nonce"),
            _previous_receipt(metadata),
        )


@message
class ReceiptMessage:
    """{"type": "receipt", "step", "receipt", "fingerprint"}: a step's receipt, sent after its output (separate
    receipts) and before the next step's output."""

    step: Any
    receipt: dict | None
    fingerprint: bytes | None = None

    def fields(self) -> dict:
        return {"step": self.step, "receipt": self.receipt, "fingerprint": self.fingerprint}

    def to_response(self) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=pack_metadata({"type": "receipt", **self.fields()}))

    @classmethod
    def _from(cls, metadata: dict, tensors: list) -> ReceiptMessage:
        return cls(metadata.get("step"), metadata.get("receipt"), metadata.get("fingerprint"))


def _previous_receipt(metadata: dict) -> ReceiptMessage | None:
    """A step answer's riding receipt (``StepReply.previous``); its fields are the client's to judge, as a
    ``ReceiptMessage``'s are."""
    previous = metadata.get("previous_receipt")
    if previous is None:
        return None
    if not isinstance(previous, dict):
        raise ValueError(f"a step answer's previous_receipt must be a map, not {type(previous).__name__}")
    return ReceiptMessage._from(previous, [])


@message
class PushMissing:
    """{"push_missing": true}: the step's push never came and the client cancelled it; relay the step instead."""

    def to_response(self) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=pack_metadata({"push_missing": True}))

    @classmethod
    def _from(cls, metadata: dict, tensors: list) -> PushMissing:
        return cls()


InferenceReply = Opened | StepReply | ReceiptMessage | PushMissing


def decode_inference_reply(response: runtime_pb2.ExpertResponse) -> InferenceReply:
    """What a node sent on an inference stream (a ``ValueError`` for a step answer without exactly one tensor)."""
    metadata, packed = unpack_metadata(response.metadata), response.tensors
    kind = metadata.get("type")
    if kind is None and packed:  # a step's output, the per-step path: read inline
        tensors = unpack_tensors(packed)
        if len(tensors) == 1:
            get = metadata.get
            return StepReply(
                tensors[0],
                get("receipt"),
                get("fingerprint"),
                get("receipt_follows") is True,
                get("cache_tokens_left"),
                get("session_nonce"),
                _previous_receipt(metadata),
            )
    tensors = unpack_tensors(packed) if packed else []
    if kind == "receipt":
        return ReceiptMessage._from(metadata, tensors)
    if kind == "opened":
        return Opened._from(metadata, tensors)
    if metadata.get("push_missing"):
        return PushMissing()
    return StepReply._from(metadata, tensors)


# ---- push (node to node) ------------------------------------------------------------------------------------------


@message
class Push:
    """``rpc_push``: {"session_id", "step", "token"}, tensors [hidden_states]: a hop's output for the next hop."""

    session_id: bytes
    step: int
    token: bytes
    hidden: torch.Tensor | None = None

    rpc: ClassVar[str] = RPC_PUSH

    def to_request(self, packed: Packed | None = None) -> runtime_pb2.ExpertRequest:
        """``packed``: the hidden states, packed already (the node's output as it also goes to its client)."""
        tensors = packed if packed is not None else pack_tensors([self.hidden])
        return runtime_pb2.ExpertRequest(
            tensors=tensors,
            metadata=pack_metadata({"session_id": self.session_id, "step": self.step, "token": self.token}),
        )

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest) -> Push:
        metadata = unpack_metadata(request.metadata)
        session_id = _session_id(metadata)
        token = metadata.get("token")
        if not isinstance(token, bytes):
            raise _bad("a push names its session's push token (bytes)")
        step = _int(metadata, "step", 0, MAX_STEP)
        tensors = unpack_tensors(request.tensors)
        if len(tensors) != 1:
            raise _bad(f"a push carries 1 hidden_states tensor, not {len(tensors)}")
        return cls(session_id, step, token, tensors[0])


@message
class PushAck:
    """{"ok": true}: one per push received."""

    def to_response(self) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=pack_metadata({"ok": True}))


# ---- unary calls --------------------------------------------------------------------------------------------------


def _call_metadata(
    client: str,
    session_id: bytes | None,
    step: int | None,
    voucher: dict | None,
    auth: ClientAuth | None = None,
    adapter: str | None = None,
) -> dict:
    metadata = {"client": client}
    _put(metadata, "adapter", adapter)
    _put(metadata, "session_id", session_id)
    _put(metadata, "step", step)
    _put(metadata, "voucher", voucher)
    if auth is not None:
        metadata["auth"] = auth.to_wire()
    return metadata


class _SignedCall:
    """``signed``/``signer`` of forward and backward calls: signed like an open, per call (a fresh nonce each)."""

    def signed(self, private_key: bytes | str, *, node: str, peer_id: str, timestamp: int | None = None):
        """This call signed with the client's paying key for ``node`` at ``peer_id``; ``client`` becomes the key's
        address."""
        from dataclasses import replace

        from nectar.wire.eip712 import address_of

        auth = ClientAuth.sign(
            private_key,
            kind=self.rpc,
            uid=self.uid,
            session_id=self.session_id,
            step=self.step,
            node=node,
            peer_id=peer_id,
            timestamp=timestamp,
            adapter=self.adapter,
        )
        return replace(self, client=address_of(private_key), auth=auth)

    def signer(self, *, node: str, peer_id: str) -> str:
        return self.auth.signer(
            kind=self.rpc,
            uid=self.uid,
            session_id=self.session_id,
            step=self.step,
            node=node,
            peer_id=peer_id,
            adapter=self.adapter,
        )


def _call_fields(metadata: dict) -> tuple[str, bytes | None, int, Any]:
    client = _client(metadata)
    # a call without a session gets a fresh id from the node (None here): two such receipts must never share
    # (session, step), or they would look like a double-sign and an honest node could be slashed
    session_id = _session_id(metadata) if "session_id" in metadata else None
    return client, session_id, _int(metadata, "step", 0, MAX_STEP, default=0), metadata.get("voucher")


@message
class ForwardCall(_SignedCall):
    """``rpc_forward``: tensors [hidden [B, T, H]] (+ [prompts]), metadata {"client", "session_id"?, "step"?,
    "voucher"?, "backward"?}.

    :param backward: False: no backward will follow, so the node runs a plain forward (no kept activations)
    """

    uid: str
    hidden: torch.Tensor
    prompts: torch.Tensor | None = None
    client: str = ZERO_ADDRESS
    session_id: bytes | None = None
    step: int | None = None
    voucher: dict | None = None
    backward: bool = True
    auth: ClientAuth | None = None
    adapter: str | None = None  # the LoRA adapter to compute with (``Open.adapter``)

    rpc: ClassVar[str] = RPC_FORWARD

    def to_request(self) -> runtime_pb2.ExpertRequest:
        metadata = _call_metadata(self.client, self.session_id, self.step, self.voucher, self.auth, self.adapter)
        if not self.backward:
            metadata["backward"] = False
        tensors = [self.hidden] + ([self.prompts] if self.prompts is not None else [])
        return runtime_pb2.ExpertRequest(uid=self.uid, tensors=pack_tensors(tensors), metadata=pack_metadata(metadata))

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest) -> ForwardCall:
        metadata = unpack_metadata(request.metadata)
        tensors = unpack_tensors(request.tensors)
        if not 1 <= len(tensors) <= 2:
            raise _bad("forward takes hidden_states and optionally prompts")
        client, session_id, step, voucher = _call_fields(metadata)
        return cls(
            request.uid,
            tensors[0],
            tensors[1] if len(tensors) > 1 else None,
            client,
            session_id,
            step,
            voucher,
            metadata.get("backward", True) is not False,
            ClientAuth.decode(metadata),
            adapter_name(metadata.get("adapter")),
        )


@message
class BackwardCall(_SignedCall):
    """``rpc_backward``: tensors [hidden, grad_outputs] (+ [prompts]), metadata as ``ForwardCall``'s."""

    uid: str
    hidden: torch.Tensor
    grad_outputs: torch.Tensor
    prompts: torch.Tensor | None = None
    client: str = ZERO_ADDRESS
    session_id: bytes | None = None
    step: int | None = None
    voucher: dict | None = None
    auth: ClientAuth | None = None
    adapter: str | None = None

    rpc: ClassVar[str] = RPC_BACKWARD

    def to_request(self) -> runtime_pb2.ExpertRequest:
        metadata = _call_metadata(self.client, self.session_id, self.step, self.voucher, self.auth, self.adapter)
        tensors = [self.hidden, self.grad_outputs] + ([self.prompts] if self.prompts is not None else [])
        return runtime_pb2.ExpertRequest(uid=self.uid, tensors=pack_tensors(tensors), metadata=pack_metadata(metadata))

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest) -> BackwardCall:
        metadata = unpack_metadata(request.metadata)
        tensors = unpack_tensors(request.tensors)
        if not 2 <= len(tensors) <= 3:
            raise _bad("backward takes hidden_states, grad_outputs and maybe prompts")
        client, session_id, step, voucher = _call_fields(metadata)
        return cls(
            request.uid,
            tensors[0],
            tensors[1],
            tensors[2] if len(tensors) > 2 else None,
            client,
            session_id,
            step,
            voucher,
            ClientAuth.decode(metadata),
            adapter_name(metadata.get("adapter")),
        )


def _reply_metadata(receipt: dict | None, fingerprint: bytes | None, session_nonce: bytes | None) -> dict:
    metadata = {"receipt": receipt, "fingerprint": fingerprint}
    _put(metadata, "session_nonce", session_nonce)
    return metadata


@message
class ForwardReply:
    """The forward's output with its receipt: tensors [output], metadata {"receipt", "fingerprint",
    "session_nonce"}: the receipt's session id is ``bind_session(call's session_id or 32 zero bytes, nonce)``, a
    nonce the node drew for this call alone."""

    output: torch.Tensor
    receipt: dict | None = None
    fingerprint: bytes | None = None
    session_nonce: bytes | None = None

    def to_response(self) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(
            tensors=pack_tensors([self.output]),
            metadata=pack_metadata(_reply_metadata(self.receipt, self.fingerprint, self.session_nonce)),
        )

    @classmethod
    def decode(cls, response: runtime_pb2.ExpertResponse) -> ForwardReply:
        tensors, metadata = unpack_tensors(response.tensors), unpack_metadata(response.metadata)
        if len(tensors) != 1:
            raise ValueError(f"a forward's answer carries one output tensor, this one {len(tensors)}")
        return cls(tensors[0], metadata.get("receipt"), metadata.get("fingerprint"), metadata.get("session_nonce"))


@message
class BackwardReply:
    """tensors [grad_inputs] (+ [grad_prompts] where the call had prompts), metadata {"receipt", "fingerprint",
    "session_nonce"} (as ``ForwardReply``'s)."""

    grad_inputs: torch.Tensor
    grad_prompts: torch.Tensor | None = None
    receipt: dict | None = None
    fingerprint: bytes | None = None
    session_nonce: bytes | None = None

    def to_response(self) -> runtime_pb2.ExpertResponse:
        tensors = [self.grad_inputs] + ([self.grad_prompts] if self.grad_prompts is not None else [])
        return runtime_pb2.ExpertResponse(
            tensors=pack_tensors(tensors),
            metadata=pack_metadata(_reply_metadata(self.receipt, self.fingerprint, self.session_nonce)),
        )

    @classmethod
    def decode(cls, response: runtime_pb2.ExpertResponse) -> BackwardReply:
        tensors, metadata = unpack_tensors(response.tensors), unpack_metadata(response.metadata)
        if not 1 <= len(tensors) <= 2:
            raise ValueError(f"a backward's answer carries 1 or 2 tensors, this one {len(tensors)}")
        return cls(
            tensors[0],
            tensors[1] if len(tensors) > 1 else None,
            metadata.get("receipt"),
            metadata.get("fingerprint"),
            metadata.get("session_nonce"),
        )

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.grad_inputs] + ([self.grad_prompts] if self.grad_prompts is not None else [])


AUDIT_MAX_SKEW_S = 300  # a signed audit call's timestamp may be this far off the node's clock (then it is stale)


def audit_digest(
    *, uid: str, session_id: bytes, step: int, node: str, peer_id: str, timestamp: int, nonce: bytes
) -> bytes:
    """What a verifier signs to audit one step: the node (address and peer id, so a call cannot be replayed at another
    node), the module, the session and step asked for, and a timestamp and nonce (so it cannot be replayed later)."""
    text = "|".join(
        [
            "nectar-audit-v1",
            f"node={str(node).lower()}",
            f"peer={peer_id}",
            f"uid={uid}",
            f"session=0x{bytes(session_id).rjust(32, bytes(1)).hex()}",
            f"step={int(step)}",
            f"timestamp={int(timestamp)}",
            f"nonce=0x{bytes(nonce).hex()}",
        ]
    )
    return schema.keccak256(text.encode())


def _verifier_signature(private_key, timestamp: int | None, digest_of) -> tuple[int, bytes, bytes]:
    """(timestamp, fresh 16-byte nonce, signature over ``digest_of(timestamp, nonce)``): how a verifier signs the
    calls only registered verifiers may make (``AuditCall``, ``AdapterCall``)."""
    import os
    import time

    from nectar.wire.eip712 import sign_digest

    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    nonce = os.urandom(16)
    return timestamp, nonce, sign_digest(digest_of(timestamp, nonce), private_key)


@message
class AuditCall:
    """``rpc_audit``: {"session_id", "step", "timestamp", "nonce", "signature"}: a session's inputs up to a step and
    the step's output, for the ledger's spot checks. Only registered verifiers may ask: the call is signed (``signed``)
    over ``audit_digest``, and the node answers only a fresh call whose signer is a verifier."""

    uid: str
    session_id: bytes
    step: int
    timestamp: int = 0
    nonce: bytes = b""
    signature: bytes = b""

    rpc: ClassVar[str] = RPC_AUDIT

    def signed(self, private_key: bytes | str, *, node: str, peer_id: str, timestamp: int | None = None) -> AuditCall:
        """This call signed by a verifier key for the node ``node`` (its receipt address) at ``peer_id``."""
        timestamp, nonce, signature = _verifier_signature(
            private_key, timestamp, lambda t, n: self._digest(node=node, peer_id=peer_id, timestamp=t, nonce=n)
        )
        return AuditCall(self.uid, self.session_id, self.step, timestamp, nonce, signature)

    def _digest(self, *, node: str, peer_id: str, timestamp: int, nonce: bytes) -> bytes:
        return audit_digest(
            uid=self.uid,
            session_id=self.session_id,
            step=self.step,
            node=node,
            peer_id=str(peer_id),
            timestamp=timestamp,
            nonce=nonce,
        )

    def signer(self, *, node: str, peer_id: str) -> str:
        """The address that signed this call for ``node`` at ``peer_id`` (raises ``InvalidSignature``)."""
        from nectar.wire.eip712 import recover_digest_signer

        digest = self._digest(node=node, peer_id=peer_id, timestamp=self.timestamp, nonce=self.nonce)
        return recover_digest_signer(digest, self.signature)

    def to_request(self) -> runtime_pb2.ExpertRequest:
        metadata = {"session_id": self.session_id, "step": self.step}
        if self.signature:
            metadata.update(timestamp=self.timestamp, nonce=self.nonce, signature=self.signature)
        return runtime_pb2.ExpertRequest(uid=self.uid, metadata=pack_metadata(metadata))

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest) -> AuditCall:
        metadata = unpack_metadata(request.metadata)
        nonce, signature = metadata.get("nonce", b""), metadata.get("signature", b"")
        if not isinstance(nonce, bytes) or len(nonce) > 32:
            raise _bad("nonce must be at most 32 bytes")
        if not isinstance(signature, bytes) or len(signature) not in (0, 65):
            raise _bad("signature must be 65 bytes")
        return cls(
            request.uid,
            _session_id(metadata),
            _int(metadata, "step", 0, MAX_STEP),
            _int(metadata, "timestamp", 0, 2**63 - 1, default=0),
            nonce,
            signature,
        )


@message
class AuditReply:
    """tensors [inputs [B, L, H]] (+ [the step's output as sent]) (+ [the first step's deep prompts]), metadata
    {"start", "end", "outputs": whether the output is there}."""

    inputs: torch.Tensor
    start: Any
    end: Any
    prompts: torch.Tensor | None = None
    outputs: torch.Tensor | None = None

    def to_response(self) -> runtime_pb2.ExpertResponse:
        tensors = (
            [self.inputs]
            + ([self.outputs] if self.outputs is not None else [])
            + ([self.prompts] if self.prompts is not None else [])
        )
        metadata = {"start": self.start, "end": self.end, "outputs": self.outputs is not None}
        return runtime_pb2.ExpertResponse(tensors=pack_tensors(tensors), metadata=pack_metadata(metadata))

    @classmethod
    def decode(cls, response: runtime_pb2.ExpertResponse) -> AuditReply:
        tensors, metadata = unpack_tensors(response.tensors), unpack_metadata(response.metadata)
        has_outputs = metadata.get("outputs") is True
        if not 1 + has_outputs <= len(tensors) <= 2 + has_outputs:
            raise ValueError(f"an audit answer carries 1 to 3 tensors as its metadata says, this one {len(tensors)}")
        outputs = tensors[1] if has_outputs else None
        prompts = tensors[1 + has_outputs] if len(tensors) > 1 + has_outputs else None
        return cls(tensors[0], metadata.get("start"), metadata.get("end"), prompts, outputs)


MAX_ADAPTER_CONFIG_BYTES = 1024**2  # an adapter_config.json past this is not one (``nectar.models.adapters``)


def adapter_call_digest(*, digest: bytes, node: str, peer_id: str, timestamp: int, nonce: bytes) -> bytes:
    """What a verifier signs to fetch an adapter's files: like ``audit_digest``, for the node, its peer id, the
    adapter's digest, a timestamp and a nonce (its own domain: an audit call's signature never passes for this)."""
    text = "|".join(
        [
            "nectar-adapter-v1",
            f"node={str(node).lower()}",
            f"peer={peer_id}",
            f"adapter=0x{bytes(digest).hex()}",
            f"timestamp={int(timestamp)}",
            f"nonce=0x{bytes(nonce).hex()}",
        ]
    )
    return schema.keccak256(text.encode())


@message
class AdapterCall:
    """``rpc_adapter``: {"digest", "timestamp", "nonce", "signature"}: the files of the LoRA adapter a node computed
    steps with (its receipts' ``ComputeSpec.adapter``), for a verifier auditing one of them. Signed and checked as an
    ``AuditCall`` is (registered verifiers only)."""

    digest: bytes
    timestamp: int = 0
    nonce: bytes = b""
    signature: bytes = b""

    rpc: ClassVar[str] = RPC_ADAPTER

    def signed(self, private_key: bytes | str, *, node: str, peer_id: str, timestamp: int | None = None) -> AdapterCall:
        timestamp, nonce, signature = _verifier_signature(
            private_key,
            timestamp,
            lambda t, n: adapter_call_digest(digest=self.digest, node=node, peer_id=peer_id, timestamp=t, nonce=n),
        )
        return AdapterCall(self.digest, timestamp, nonce, signature)

    def signer(self, *, node: str, peer_id: str) -> str:
        """The address that signed this call for ``node`` at ``peer_id`` (raises ``InvalidSignature``)."""
        from nectar.wire.eip712 import recover_digest_signer

        digest = adapter_call_digest(
            digest=self.digest, node=node, peer_id=str(peer_id), timestamp=self.timestamp, nonce=self.nonce
        )
        return recover_digest_signer(digest, self.signature)

    def to_request(self) -> runtime_pb2.ExpertRequest:
        metadata = {"digest": self.digest}
        if self.signature:
            metadata.update(timestamp=self.timestamp, nonce=self.nonce, signature=self.signature)
        return runtime_pb2.ExpertRequest(uid="", metadata=pack_metadata(metadata))

    @classmethod
    def decode(cls, request: runtime_pb2.ExpertRequest) -> AdapterCall:
        metadata = unpack_metadata(request.metadata)
        digest, nonce, signature = (metadata.get(k, b"") for k in ("digest", "nonce", "signature"))
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise _bad("digest must be the adapter's 32-byte sha256 (its receipts' ComputeSpec.adapter)")
        if not isinstance(nonce, bytes) or len(nonce) > 32:
            raise _bad("nonce must be at most 32 bytes")
        if not isinstance(signature, bytes) or len(signature) not in (0, 65):
            raise _bad("signature must be 65 bytes")
        return cls(digest, _int(metadata, "timestamp", 0, 2**63 - 1, default=0), nonce, signature)


@message
class AdapterReply:
    """tensors [the adapter's config file, its weights file], each its bytes as a flat uint8 tensor (the files whose
    sha256 is the digest asked for: the caller checks)."""

    config: bytes
    weights: bytes

    def to_response(self) -> runtime_pb2.ExpertResponse:
        # the bytes as they are (a flat uint8 tensor's wire form): no copy through torch of a file up to a GiB
        files = [
            runtime_pb2.Tensor(
                compression=runtime_pb2.CompressionType.NONE, buffer=data, size=[len(data)], dtype="uint8"
            )
            for data in (bytes(self.config), bytes(self.weights))
        ]
        return runtime_pb2.ExpertResponse(tensors=files, metadata=pack_metadata({}))

    @classmethod
    def decode(cls, response: runtime_pb2.ExpertResponse) -> AdapterReply:
        if len(response.tensors) != 2:
            raise ValueError(f"an adapter answer carries 2 files, this one {len(response.tensors)}")
        config, weights = response.tensors
        for part in (config, weights):
            if (
                part.dtype != "uint8"
                or list(part.size) != [len(part.buffer)]
                or part.compression != runtime_pb2.CompressionType.NONE
            ):
                raise ValueError("an adapter answer carries each file as an uncompressed flat uint8 tensor")
        if len(config.buffer) > MAX_ADAPTER_CONFIG_BYTES:
            raise ValueError(f"an adapter config of {len(config.buffer)} bytes (at most {MAX_ADAPTER_CONFIG_BYTES})")
        return cls(bytes(config.buffer), bytes(weights.buffer))


@message
class InfoCall:
    """``rpc_info``: an empty request."""

    uid: str = ""

    rpc: ClassVar[str] = RPC_INFO

    def to_request(self) -> runtime_pb2.ExpertRequest:
        return runtime_pb2.ExpertRequest(uid=self.uid, metadata=pack_metadata({}))


@message
class InfoReply:
    """The node's announcement and counters (``ServerInfo.to_dict()`` plus model, version, compute, push...)."""

    info: dict

    def to_response(self) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=pack_metadata(self.info))

    @classmethod
    def decode(cls, response: runtime_pb2.ExpertResponse) -> InfoReply:
        return cls(unpack_metadata(response.metadata))


__all__ = [
    "AUDIT_MAX_SKEW_S",
    "AdapterCall",
    "AdapterReply",
    "adapter_call_digest",
    "MAX_ADAPTER_CONFIG_BYTES",
    "audit_digest",
    "AuditCall",
    "AuditReply",
    "BackwardCall",
    "BackwardReply",
    "Cancel",
    "Flush",
    "ForwardCall",
    "ForwardReply",
    "InferenceReply",
    "InferenceRequest",
    "InfoCall",
    "InfoReply",
    "MAX_STEP",
    "Open",
    "Opened",
    "Pay",
    "Push",
    "PushAck",
    "PushMissing",
    "PushTarget",
    "ReceiptMessage",
    "Step",
    "StepReply",
    "ZERO_ADDRESS",
    "decode_inference_reply",
    "decode_inference_request",
]
