"""What nodes announce on the DHT, and the validator that makes announcements unforgeable.

Every record is stored under ``subkey = peer id`` and signed with that peer's Ed25519 libp2p key. All Nectar DHT
peers run ``AnnouncementValidator``, so they refuse to store (or return) a record that a peer wrote for another peer,
and clients drop any record whose signature does not verify. A peer therefore cannot publish or overwrite another
peer's records.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

from nectar.wire.identity import peer_id_of, public_key_of_peer

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "nectar/1"
MODELS_KEY = "nectar.models"  # subkey = peer id, value = {model_id: num_blocks}


class ServerState(enum.IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


def block_key(model_id: str, block_index: int) -> str:
    return f"nectar.{model_id}.{block_index}"


@dataclass
class ServerInfo:
    """One node's announcement for each block it hosts (Petals' ServerInfo, plus market fields)."""

    state: int
    start: int
    end: int
    throughput: float  # tokens/s the node can push through one block (min of compute and network), for routing
    inference_rps: float  # decode steps/s through the whole span, measured at start
    forward_rps: float  # prefill/forward tokens/s through the whole span, measured at start
    network_rps: float  # tokens/s the node's link carries for this model's hidden size
    dtype: str
    cache_tokens_left: int
    price_per_token: int  # credit wei per token per block
    eth_address: str
    public_name: str = ""
    direct_address: str = ""  # HOST:PORT of the node's plaintext TCP lane (nectar.wire.direct); "" = P2P only
    version: str = PROTOCOL_VERSION
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerInfo:
        if not isinstance(data, dict):
            raise TypeError(f"ServerInfo must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        info = cls(**{k: v for k, v in data.items() if k in known})
        if not (0 <= info.start < info.end) or info.state not in set(ServerState):
            raise ValueError(f"Invalid span or state in {data}")
        return info


class AnnouncementValidator(RecordValidatorBase):
    """Requires every record's subkey to be a peer id and its value to carry that peer's Ed25519 signature.

    :param private_key: the local peer's libp2p key; records this peer stores are signed with it.
      Pass None on peers that only read (clients).
    """

    SIGNATURE_MARKER = b"\x00nectar-sig:"
    SIGNATURE_SUFFIX_LEN = len(SIGNATURE_MARKER) + 64

    def __init__(self, private_key: Ed25519PrivateKey | None = None):
        self._private_key = private_key
        self._local_subkey = (
            MSGPackSerializer.dumps(peer_id_of(private_key).to_bytes()) if private_key is not None else None
        )

    def __getstate__(self):  # the DHT runs in a child process; keep the key as raw bytes across pickling
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        raw = (
            self._private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            if self._private_key is not None
            else None
        )
        return {"raw": raw}

    def __setstate__(self, state):
        key = Ed25519PrivateKey.from_private_bytes(state["raw"]) if state["raw"] is not None else None
        self.__init__(key)

    @staticmethod
    def _signed_bytes(record: DHTRecord, stripped_value: bytes) -> bytes:
        return MSGPackSerializer.dumps((record.key, record.subkey, stripped_value, record.expiration_time))

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey is None or len(record.value) < self.SIGNATURE_SUFFIX_LEN:
            return False
        try:
            peer_bytes = MSGPackSerializer.loads(record.subkey)
            public_key = public_key_of_peer(peer_bytes) if isinstance(peer_bytes, bytes) else None
        except Exception:
            return False
        if public_key is None:
            return False
        value, suffix = record.value[: -self.SIGNATURE_SUFFIX_LEN], record.value[-self.SIGNATURE_SUFFIX_LEN :]
        if not suffix.startswith(self.SIGNATURE_MARKER):
            return False
        try:
            public_key.verify(suffix[len(self.SIGNATURE_MARKER) :], self._signed_bytes(record, value))
        except InvalidSignature:
            logger.debug(f"Dropping a DHT record with a forged signature for peer {PeerID(peer_bytes)}")
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._private_key is None or record.subkey != self._local_subkey:
            return record.value  # not ours to sign: validate() will reject it everywhere
        signature = self._private_key.sign(self._signed_bytes(record, record.value))
        return record.value + self.SIGNATURE_MARKER + signature

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value[: -self.SIGNATURE_SUFFIX_LEN]

    @property
    def priority(self) -> int:
        return 20

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, AnnouncementValidator)
