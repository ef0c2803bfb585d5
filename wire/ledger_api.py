"""The ledger's HTTP API, from the outside: its routes, its JSON shapes, and the one client of it.

The node (``LedgerPaymentPolicy`` posts its receipts and vouchers), the client's routing (reputation scores) and the
API gateway (a node's receipts and earnings) all talk to ``nectar ledger`` through here; the ledger's routes take
their paths from the constants below, so the two sides cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from nectar.wire.protocol import peer_text
from nectar.wire.receipts import SignedReceipt, SignedVoucher

logger = logging.getLogger(__name__)

# ---- routes: PREFIX + path (the ledger mounts its routers under PREFIX) ------------------------------------------
PREFIX = "/v1"
RECEIPTS = "/receipts"  # POST {"receipts": [receipt_item(...)]} -> batch result
VOUCHERS = "/vouchers"  # POST {"vouchers": [signed voucher JSON]} -> batch result
REPUTATION = "/reputation"  # GET -> {"nodes": [{"address", "score", "new", "spot_failed", "slashes", ...}]}
NODE = "/nodes/{address}"  # GET -> a node's receipts, earnings, settlements and reputation
REPORTS = "/reports"  # POST a client's signed measurement of a node (report_message)
EPOCHS = "/epochs"  # GET -> [epoch]
CLOSE_EPOCH = "/epochs/close"  # POST ?allow_empty=, admin token
CONFIG = "/config"  # GET -> the ledger's public settings
STAKES = "/stakes"  # GET -> the registry of the deployment the ledger settles on (stake gate; see below)
STAKE = "/stakes/{address}"  # GET -> one node's registration, read from the chain now
VERIFIERS = "/verifiers"  # GET -> {"verifiers": [address], "source"}: who may audit nodes (sign AuditCall)
BACKING = "/backing/{client}/{node}"  # GET -> Backing.to_json(): what backs client's vouchers to node on chain
HEALTH = "/health"  # GET, outside PREFIX


# ---- JSON shapes ---------------------------------------------------------------------------------------------------
MAX_FINGERPRINT_BYTES = 64  # a receipt item's fingerprintBytes (a compute descriptor is 8); more is refused, not stored
MAX_ITEM_STRING_CHARS = 256  # any other string in a receipt or voucher item (hex fields, addresses, decimal amounts)


def receipt_item(signed: SignedReceipt, fingerprint: bytes | None, countersignature: bytes | None = None) -> dict:
    """One entry of a receipts submission: the signed receipt and its fingerprint's bytes; from a client, also its
    countersignature (``eip712.countersign_receipt``), with which the fingerprint may be None (not received)."""
    item = {**signed.to_json(), "fingerprintBytes": None if fingerprint is None else "0x" + bytes(fingerprint).hex()}
    if countersignature is not None:
        item["clientSignature"] = "0x" + bytes(countersignature).hex()
    return item


def report_message(report: Any) -> str:
    """The exact text a reporter signs (EIP-191) for ``POST /v1/reports`` (stable field order); ``report`` is a dict
    or a pydantic model. ``nonce``: an integer above every nonce the ledger accepted from this reporter about this
    node (the ledger counts a report once; ``time.time_ns()`` serves)."""
    data = report.model_dump() if hasattr(report, "model_dump") else dict(report)
    fields = ("node", "reporter", "nonce", "online", "success", "latency_ms", "throughput", "timestamp")
    for name in ("latency_ms", "throughput"):  # 40 and 40.0 must sign the same
        if data.get(name) is not None:
            data[name] = float(data[name])
    return "nectar-report:" + "|".join(f"{name}={data.get(name)}" for name in fields)


@dataclass(frozen=True)
class NodeReputation:
    """A node's entry of ``GET /v1/reputation`` as routing reads it."""

    score: float
    new: bool
    penalized: bool  # any failed spot check, slash or double-sign conflict on record

    @classmethod
    def from_json(cls, item: dict) -> NodeReputation:
        return cls(
            score=float(item["score"]),
            new=bool(item.get("new", False)),
            penalized=bool(item.get("spot_failed", 0) or item.get("slashes", 0) or item.get("conflicts", 0)),
        )


# ---- the stake gate (issue 20): who may earn through this ledger ------------------------------------------------
# A node earns through a ledger only while registered on the ledger's deployment (NodeRegistry) with a bonded stake
# of at least the registry's minStake, under the peer id it announces. Stake being unbonded does not count. The
# peer id binds the announced Ethereum address to the libp2p peer: the registration is a transaction signed by the
# address, so a peer announcing someone else's staked address fails the check.
@dataclass(frozen=True)
class NodeStake:
    """A node's entry of ``GET /v1/stakes`` (amounts in credit wei)."""

    address: str
    registered: bool
    peer_id: str
    bonded: int
    unbonding: int
    unlock_at: int  # unix time the unbonding amount can be withdrawn
    min_stake: int

    @property
    def eligible(self) -> bool:
        """Registered with at least the minimum bonded stake (which may earn and be routed to)."""
        return self.registered and self.bonded >= max(self.min_stake, 1)

    def eligible_for(self, peer_id: str) -> bool:
        """Eligible, and registered under ``peer_id`` (the peer announcing this address)."""
        return self.eligible and self.peer_id == str(peer_id)

    def problem(self, peer_id: str | None = None) -> str | None:
        """Why this node may not earn (None if it may)."""
        if not self.registered:
            return "not registered"
        if self.bonded < max(self.min_stake, 1):
            return f"bonded stake {self.bonded} is below the minimum {self.min_stake} (unbonding {self.unbonding})"
        if peer_id is not None and self.peer_id != str(peer_id):
            return f"registered under peer id {self.peer_id!r}, not {str(peer_id)!r}"
        return None

    def to_json(self) -> dict:
        return {
            "address": self.address,
            "registered": self.registered,
            "peer_id": self.peer_id,
            "bonded": str(self.bonded),
            "unbonding": str(self.unbonding),
            "unlock_at": self.unlock_at,
            "eligible": self.eligible,
            "min_stake": str(self.min_stake),
        }

    @classmethod
    def from_json(cls, item: dict, *, min_stake: int) -> NodeStake:
        return cls(
            address=str(item["address"]),
            registered=bool(item["registered"]),
            peer_id=str(item.get("peer_id") or ""),
            bonded=int(item["bonded"]),
            unbonding=int(item.get("unbonding", 0)),
            unlock_at=int(item.get("unlock_at", 0)),
            min_stake=min_stake,
        )


@dataclass(frozen=True)
class StakeTable:
    """``GET /v1/stakes``: ``{"min_stake", "refreshed_at", "nodes": [NodeStake JSON]}``, by lower-case address."""

    min_stake: int
    nodes: dict[str, NodeStake]
    refreshed_at: float = 0.0

    def get(self, address: str) -> NodeStake | None:
        return self.nodes.get(str(address).lower())

    def to_json(self) -> dict:
        return {
            "min_stake": str(self.min_stake),
            "refreshed_at": self.refreshed_at,
            "nodes": [n.to_json() for n in self.nodes.values()],
        }

    @classmethod
    def from_json(cls, data: dict) -> StakeTable:
        min_stake = int(data["min_stake"])
        nodes = [NodeStake.from_json(item, min_stake=min_stake) for item in data["nodes"]]
        return cls(min_stake, {n.address.lower(): n for n in nodes}, float(data.get("refreshed_at", 0.0)))


# ---- backed vouchers (issue 20): what the chain guarantees a node for a client ------------------------------------
@dataclass(frozen=True)
class Backing:
    """What on chain backs ``client``'s vouchers to ``node`` (``GET /v1/backing/{client}/{node}``), in credit wei.

    ``settled``: what the chain has paid on the client's channels to the node (the ones the ledger knows);
    ``reserve``: the client's reserve for the node, which only the node's vouchers can draw on; ``pending_release``:
    the part of it the client asked to release at ``release_at`` (it leaves then: not to be served against).
    A node's work for the client is backed up to ``backed`` = settled + reserve - pending_release: the reserve is
    drawn only for the node's vouchers and settled payments already came out of it, so the sum stays put as the
    node settles."""

    client: str
    node: str
    settled: int
    reserve: int
    pending_release: int
    release_at: int
    unlock_delay: int  # seconds a release takes: the node's window to settle

    @property
    def backed(self) -> int:
        return self.settled + max(self.reserve - self.pending_release, 0)

    def to_json(self) -> dict:
        return {
            "client": self.client,
            "node": self.node,
            "settled": str(self.settled),
            "reserve": str(self.reserve),
            "pending_release": str(self.pending_release),
            "release_at": self.release_at,
            "unlock_delay": self.unlock_delay,
            "backed": str(self.backed),
        }

    @classmethod
    def from_json(cls, data: dict) -> Backing:
        """Parses the ledger's answer; amounts must be non-negative integers (a hostile ledger gets a clear error)."""
        try:
            values = {k: int(data[k]) for k in ("settled", "reserve", "pending_release", "release_at", "unlock_delay")}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed backing answer from the ledger: {e!r}") from None
        if any(v < 0 for v in values.values()):
            raise ValueError(f"malformed backing answer from the ledger: negative amount in {values}")
        return cls(client=str(data.get("client", "")), node=str(data.get("node", "")), **values)


def reserve_command(node: str, amount: int | None = None) -> str:
    """The command a client runs to back its vouchers to ``node`` (the node's credit errors quote it)."""
    credits = f"{amount / 10**18:g}" if amount is not None else "CREDITS"
    return f"nectar escrow reserve --node {node} --amount {credits} --key-file YOUR_KEY_FILE"


# ---- the client --------------------------------------------------------------------------------------------------
class LedgerError(Exception):
    """The ledger answered with an error status; the message carries its explanation."""

    def __init__(self, status: int, detail):
        super().__init__(f"ledger answered {status}: {detail}")
        self.status, self.detail = status, detail


MAX_ANSWER_BYTES = 16 << 20  # a ledger answer read at most (its largest, the reputation of every node, is far less)


def _bounded_body(response: httpx.Response, limit: int, seconds: float) -> bytes:
    """The body of a streamed ``response``, refused past ``limit`` bytes (declared or read) or ``seconds`` in all
    (each read's timeout restarts: a ledger sending a byte at a time would hold the call forever), before more is
    spent. Only uncompressed answers are read (the client asks for them): a compressed one grows in memory before it
    can be counted. Whoever runs the ledger a node or client points at chooses what it answers."""
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise LedgerError(502, f"the ledger's answer is {peer_text(encoding, 40)}-encoded; it was asked for none")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise LedgerError(502, f"the ledger's answer declares {declared} bytes; at most {limit} are read")
    deadline = time.monotonic() + seconds
    chunks, size = [], 0
    for chunk in response.iter_raw():
        size += len(chunk)
        if size > limit:
            raise LedgerError(502, f"the ledger's answer passed {limit} bytes; not read further")
        if time.monotonic() > deadline:
            raise LedgerError(504, f"the ledger's answer took more than {seconds:g}s; not read further")
        chunks.append(chunk)
    return b"".join(chunks)


class LedgerClient:
    """Thin synchronous client. Thread-safe (one httpx.Client).

    :param base_url: e.g. ``http://127.0.0.1:8700``
    :param timeout: seconds per request
    :param admin_token: only for ``close_epoch`` and fresh reads
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0, admin_token: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers={"Accept-Encoding": "identity"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> dict | list:
        with self._http.stream(method, path, **kwargs) as response:
            body = _bounded_body(response, MAX_ANSWER_BYTES, self.timeout)
        if response.status_code >= 400:
            try:
                detail = json.loads(body).get("detail", body.decode(errors="replace"))
            except (ValueError, AttributeError):
                detail = body.decode(errors="replace")
            raise LedgerError(response.status_code, peer_text(detail))
        return json.loads(body)

    def submit_receipts(self, items: Sequence[tuple]) -> dict:
        """Post (signed receipt, fingerprint bytes[, client countersignature]) tuples; returns per-item verdicts."""
        body = [receipt_item(*item) for item in items]
        return self._request("POST", PREFIX + RECEIPTS, json={"receipts": body})

    def submit_vouchers(self, vouchers: Sequence[SignedVoucher]) -> dict:
        return self._request("POST", PREFIX + VOUCHERS, json={"vouchers": [v.to_json() for v in vouchers]})

    def reputation(self) -> list[dict]:
        return self._request("GET", PREFIX + REPUTATION)["nodes"]

    def reputation_scores(self) -> dict[str, NodeReputation]:
        """``GET /v1/reputation`` by lower-case address."""
        return {str(n["address"]).lower(): NodeReputation.from_json(n) for n in self.reputation()}

    def node(self, address: str) -> dict:
        return self._request("GET", PREFIX + NODE.format(address=address))

    def _fresh(self, fresh: bool) -> dict:
        """``fresh``: skip the ledger's few-second cache of chain reads (its operator only: the admin token)."""
        if not fresh:
            return {}
        return {"params": {"fresh": "true"}, "headers": {"Authorization": f"Bearer {self.admin_token}"}}

    def backing(self, client: str, node: str, *, fresh: bool = False) -> Backing:
        """What backs ``client``'s vouchers to ``node`` on chain (settled + reserve), read through the ledger (at
        most its ``chain_read_cache_s`` old unless ``fresh``)."""
        path = PREFIX + BACKING.format(client=client, node=node)
        return Backing.from_json(self._request("GET", path, **self._fresh(fresh)))

    def epochs(self) -> list[dict]:
        return self._request("GET", PREFIX + EPOCHS)

    def config(self) -> dict:
        return self._request("GET", PREFIX + CONFIG)

    def verifiers(self) -> list[str]:
        """``GET /v1/verifiers``: the addresses whose signed audit calls a node answers (Slashing's verifiers)."""
        data = self._request("GET", PREFIX + VERIFIERS)
        found = data.get("verifiers") if isinstance(data, dict) else None
        if not isinstance(found, list) or not all(isinstance(a, str) for a in found):
            raise ValueError(f"malformed verifier list from the ledger: {data!r:.200}")
        return found

    def stakes(self) -> StakeTable:
        """``GET /v1/stakes``: every node registered on the ledger's deployment and the minimum stake."""
        return StakeTable.from_json(self._request("GET", PREFIX + STAKES))

    def stake(self, address: str, *, fresh: bool = False) -> NodeStake:
        """``GET /v1/stakes/{address}``: one node's registration, read from the chain (at most the ledger's
        ``chain_read_cache_s`` old unless ``fresh``)."""
        data = self._request("GET", PREFIX + STAKE.format(address=address), **self._fresh(fresh))
        return NodeStake.from_json(data, min_stake=int(data["min_stake"]))

    def health(self) -> dict:
        return self._request("GET", HEALTH)

    def close_epoch(self, *, allow_empty: bool = False) -> dict:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        return self._request("POST", PREFIX + CLOSE_EPOCH, params={"allow_empty": allow_empty}, headers=headers)

    def report(
        self,
        *,
        private_key,
        node: str,
        online: bool | None = None,
        success: bool | None = None,
        latency_ms: float | None = None,
        throughput: float | None = None,
        nonce: int | None = None,
    ) -> dict:
        """Report a measurement of ``node`` as the client owning ``private_key`` (it must have paid that node on chain
        or hold a reserve for it); ``nonce`` defaults to the clock in nanoseconds."""
        from eth_account import Account
        from eth_account.messages import encode_defunct

        body = {
            "node": node,
            "reporter": Account.from_key(private_key).address,
            "nonce": time.time_ns() if nonce is None else int(nonce),
            "online": online,
            "success": success,
            "latency_ms": latency_ms,
            "throughput": throughput,
            "timestamp": int(time.time()),
        }
        signature = Account.sign_message(encode_defunct(text=report_message(body)), private_key).signature
        return self._request("POST", PREFIX + REPORTS, json={**body, "signature": "0x" + bytes(signature).hex()})


# ---- the node's payment hook -------------------------------------------------------------------------------------
class LedgerPaymentPolicy:
    """Batches and posts receipts/vouchers from a background thread; never blocks the caller.

    A node's payment hook (``nectar.node.payments.PaymentPolicy``'s methods): the step only appends to an in-memory
    queue; the thread posts batches, retrying with backoff while the ledger is down, and ``shutdown`` flushes what is
    left. Items the ledger rejects are logged, not retried.

    :param ledger_url: base URL of ``nectar ledger``
    :param batch_size: items per POST
    :param flush_interval: seconds between posts when the queue is not full
    :param max_queue: receipts kept while the ledger is unreachable (oldest dropped past it, with a warning)
    """

    def __init__(
        self,
        ledger_url: str,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        max_queue: int = 1_000_000,
        client: LedgerClient | None = None,
    ):
        self.client = client or LedgerClient(ledger_url, timeout=10.0)
        self.batch_size, self.flush_interval, self.max_queue = batch_size, flush_interval, max_queue
        self._receipts: deque = deque()
        self._vouchers: dict[tuple, object] = {}  # latest voucher per channel only
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.sent_receipts = self.sent_vouchers = self.rejected = 0
        self._thread = threading.Thread(target=self._loop, name="ledger-policy", daemon=True)
        self._thread.start()

    def on_receipt(self, signed_receipt, fingerprint: bytes | None, countersignature: bytes | None = None) -> None:
        """Queues a receipt (a client also passes its countersignature; see ``nectar.client.payments``)."""
        item = (
            (signed_receipt, fingerprint)
            if countersignature is None
            else (signed_receipt, fingerprint, countersignature)
        )
        with self._lock:
            if len(self._receipts) >= self.max_queue:
                self._receipts.popleft()
                logger.warning("Ledger unreachable for long: dropping the oldest queued receipt")
            self._receipts.append(item)
            full = len(self._receipts) >= self.batch_size
        if full:
            self._wake.set()

    def on_voucher(self, signed_voucher) -> None:
        v = signed_voucher.voucher
        key = v.channel
        with self._lock:
            current = self._vouchers.get(key)
            if current is None or current.voucher.cumulative_amount < v.cumulative_amount:
                self._vouchers[key] = signed_voucher

    def pending(self) -> int:
        with self._lock:
            return len(self._receipts) + len(self._vouchers)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread after posting everything queued (gives up after ``timeout`` seconds)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self.pending():
            logger.warning(f"Ledger policy stopped with {self.pending()} items unsent (ledger unreachable)")
        self.client.close()

    def _loop(self) -> None:
        backoff = self.flush_interval
        deadline = None
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            if self._stopping.is_set() and deadline is None:
                deadline = time.monotonic() + 25.0
            try:
                while self._flush_once():
                    pass
                backoff = self.flush_interval
            except (httpx.HTTPError, LedgerError) as e:
                backoff = min(max(backoff * 2, 0.5), 30.0)
                logger.warning(f"Could not reach the ledger ({e}); retrying in {backoff:.1f}s")
            if self._stopping.is_set():
                if deadline is None:  # stopping was asked while this pass flushed
                    deadline = time.monotonic() + 25.0
                if not self.pending() or time.monotonic() > deadline:
                    return
                backoff = min(backoff, 1.0)

    def _flush_once(self) -> bool:
        """Post one batch of each kind; True if there may be more. Items stay queued until the ledger answered."""
        with self._lock:
            receipts = [self._receipts[i] for i in range(min(self.batch_size, len(self._receipts)))]
            vouchers = list(self._vouchers.items())[: self.batch_size]
        if vouchers:
            try:
                self._count(self.client.submit_vouchers([v for _, v in vouchers]), "voucher")
            except LedgerError as e:
                if e.status != 422:
                    raise
                logger.error(f"Ledger refused a malformed voucher batch, dropping it: {e.detail}")
            with self._lock:
                for key, voucher in vouchers:
                    if self._vouchers.get(key) is voucher:
                        del self._vouchers[key]
            self.sent_vouchers += len(vouchers)
        if receipts:
            try:
                result = self.client.submit_receipts(receipts)
            except LedgerError as e:
                if e.status != 422:
                    raise
                logger.error(f"Ledger refused a malformed receipt batch, dropping it: {e.detail}")
                result = None
            if result is not None:
                self._count(result, "receipt")
            with self._lock:
                for _ in receipts:
                    self._receipts.popleft()
            self.sent_receipts += len(receipts)
        return len(receipts) == self.batch_size

    def _count(self, result: dict, what: str) -> None:
        for item in result.get("results", []):
            if item["status"] == "rejected":
                self.rejected += 1
                logger.warning(f"Ledger rejected a {what}: {item['reason']}: {item['message']}")
