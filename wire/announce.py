"""What nodes announce on the DHT, and the validator that makes announcements unforgeable.

Every record is stored under ``subkey = peer id`` and signed with that peer's Ed25519 libp2p key. All Nectar DHT
peers run ``AnnouncementValidator``, so they refuse to store (or return) a record that a peer wrote for another peer,
and clients drop any record whose signature does not verify. A peer therefore cannot publish or overwrite another
peer's records.

Two more rules make a record's claims cheap to check and short-lived:

- **The Ethereum address is proven.** ``eth_proof`` is a signature by the announced ``eth_address`` over the
  announcing peer id (``sign_eth_proof``). Readers (``nectar.wire.swarm``) blank the address of a record whose proof
  does not verify, so a sybil cannot borrow a staked or reputable node's address (and its stake or score).
- **Records age out, on the reader's clock and in storage.** A record is read only while its signed ``timestamp`` is
  at most ``MAX_RECORD_AGE`` old (and not in the future): a record that claims to live for a day is dead
  ``MAX_RECORD_AGE`` after it was made, whatever expiry its signer wrote. Nodes re-announce every
  ``announce_period`` (clamped to at most half of it). ``AnnouncementValidator`` also refuses to store or return a
  record whose DHT expiry is more than ``MAX_RECORD_EXPIRY`` ahead, so DHT peers drop a sybil's records soon after
  the sybil stops refreshing them.
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
from hivemind.utils import MSGPackSerializer, get_dht_time

from nectar.wire.eip712 import recover_digest_signer, sign_digest
from nectar.wire.fingerprints import QUANTIZATIONS
from nectar.wire.identity import peer_id_of, public_key_of_peer
from nectar.wire.protocol import ADAPTER_NAME, MAX_ADAPTERS, peer_text
from nectar.wire.receipts import keccak256

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "nectar/1"
MODELS_KEY = "nectar.models"  # subkey = peer id, value = {model_id: num_blocks}
MAX_RECORD_AGE = 60.0  # s: readers ignore an announcement made longer ago than this, whatever its expiry says
MAX_CLOCK_SKEW = 30.0  # s: an announcement dated further ahead than this is ignored (a forged "forever" timestamp)
MAX_RECORD_EXPIRY = MAX_RECORD_AGE + MAX_CLOCK_SKEW  # s ahead: DHT peers refuse to store or return a record expiring
# later (readers ignore it after MAX_RECORD_AGE anyway; storing it longer only lets it outlive its signer)
_ETH_PROOF_PREFIX = b"nectar/peer-address/1:"
MAX_PUBLIC_NAME = 64  # characters: a name is printed in logs, errors, tables and the monitor page
MAX_ANNOUNCED_CREDIT = 2**63 - 1  # msgpack's integers: a larger credit limit is announced as this
MAX_FIELD = 256  # characters of an announced address, proof or dtype (a proof is 132, an address at most ~60)


def public_name_valid(name: Any) -> bool:
    """A node's announced name: at most MAX_PUBLIC_NAME printable characters (no newlines or terminal escapes that
    would forge log lines or tables)."""
    return isinstance(name, str) and len(name) <= MAX_PUBLIC_NAME and name.isprintable()


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
    eth_proof: str = ""  # hex signature by eth_address over the peer id (sign_eth_proof); readers blank unproven ones
    relayed: bool = False  # reachable only through a circuit relay (behind NAT): an extra hop, no direct lane
    adapters: list[str] = field(default_factory=list)  # LoRA adapters it serves on these blocks (requests name one)
    quant: str = "none"  # weight quantization (fingerprints.QUANTIZATIONS); its receipts commit to the same
    credit_limit: int = 0  # credit wei a client may owe it beyond its checked vouchers: a client that owes it less
    # than a quarter of this since its last voucher may reuse that voucher for a while (0: sign one every step)
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
        numbers = (info.throughput, info.inference_rps, info.forward_rps, info.network_rps, info.timestamp)
        if not all(isinstance(x, int | float) and x == x for x in numbers) or not all(
            isinstance(x, int)
            for x in (info.start, info.end, info.cache_tokens_left, info.price_per_token, info.credit_limit)
        ):
            raise ValueError(f"Non-numeric speed, span, cache or price in {peer_text(data)}")
        if not 0 <= info.credit_limit <= MAX_ANNOUNCED_CREDIT:
            raise ValueError(f"credit_limit out of range in {peer_text(data)}")
        texts = (info.eth_address, info.direct_address, info.eth_proof, info.dtype)
        if not all(isinstance(x, str) and len(x) <= MAX_FIELD and x.isprintable() for x in texts):
            raise ValueError(f"Non-string, oversized or unprintable address, proof or dtype in {peer_text(data)}")
        if not isinstance(info.relayed, bool):
            raise ValueError(f"Non-boolean relayed in {peer_text(data)}")
        if info.quant not in QUANTIZATIONS.values():
            raise ValueError(f"Unknown weight quantization in {peer_text(data)}")
        if not public_name_valid(info.public_name):
            raise ValueError(f"public_name must be at most {MAX_PUBLIC_NAME} printable characters in {peer_text(data)}")
        if not (0 <= info.start < info.end) or info.state not in set(ServerState):
            raise ValueError(f"Invalid span or state in {peer_text(data)}")
        adapters = info.adapters
        if not (
            isinstance(adapters, list | tuple)
            and len(adapters) <= MAX_ADAPTERS
            and all(isinstance(a, str) and ADAPTER_NAME.match(a) for a in adapters)
        ):
            raise ValueError(f"adapters must be a list of at most {MAX_ADAPTERS} adapter names in {peer_text(data)}")
        info.adapters = list(adapters)
        return info


def _eth_proof_digest(peer_id: bytes) -> bytes:
    # EIP-191 personal message, so any Ethereum wallet can produce the proof
    message = _ETH_PROOF_PREFIX + peer_id
    return keccak256(b"\x19Ethereum Signed Message:\n" + str(len(message)).encode() + message)


def sign_eth_proof(private_key: str | bytes, peer_id: PeerID | bytes) -> str:
    """The ``eth_proof`` of a node: its Ethereum key's signature over its peer id, hex."""
    raw = peer_id.to_bytes() if isinstance(peer_id, PeerID) else peer_id
    return "0x" + sign_digest(_eth_proof_digest(raw), private_key).hex()


_proofs: dict[tuple[bytes, str, str], bool] = {}  # verified (peer, address, proof) -> ok; bounded below


def eth_proof_valid(peer_id: PeerID | bytes, eth_address: str, eth_proof: str) -> bool:
    """Whether ``eth_proof`` is ``eth_address``'s signature over ``peer_id`` (cached: readers see each record often)."""
    raw = peer_id.to_bytes() if isinstance(peer_id, PeerID) else peer_id
    if not (isinstance(eth_address, str) and isinstance(eth_proof, str)) or len(eth_proof) > 200:
        return False
    key = (raw, eth_address.lower(), eth_proof)
    known = _proofs.get(key)
    if known is None:
        try:
            signature = bytes.fromhex(eth_proof.removeprefix("0x"))
            known = recover_digest_signer(_eth_proof_digest(raw), signature).lower() == eth_address.lower()
        except Exception:
            known = False
        if len(_proofs) >= 65536:  # sybils can mint unlimited records: forget, never grow without bound
            _proofs.clear()
        _proofs[key] = known
    return known


def record_fresh(info: ServerInfo, now: float | None = None, max_age: float = MAX_RECORD_AGE) -> bool:
    """Whether a reader may use ``info``: made at most ``max_age`` s ago on the reader's clock, not dated ahead."""
    now = time.time() if now is None else now
    try:
        timestamp = float(info.timestamp)
    except (TypeError, ValueError):
        return False
    return now - max_age <= timestamp <= now + MAX_CLOCK_SKEW


class AnnouncementValidator(RecordValidatorBase):
    """Requires every record's subkey to be a peer id and its value to carry that peer's Ed25519 signature.

    :param private_key: the local peer's libp2p key; records this peer stores are signed with it.
      Pass None on peers that only read (clients).
    """

    SIGNATURE_MARKER = b"\x00nectar-sig:"
    max_expiry = MAX_RECORD_EXPIRY  # s ahead of now a stored or returned record may expire
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
        if not record.expiration_time <= get_dht_time() + self.max_expiry:  # also refuses NaN
            logger.debug("Dropping a DHT record that claims to live longer than readers use it")
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
