"""Signing proof-of-inference receipts and tracking what each client owes this node.

The node signs one receipt per step it computes; clients answer with cumulative vouchers. ``CreditLedger`` refuses
work once a client's unpaid amount would pass the node's credit limit, so a client that stops paying costs the node
at most that limit.

With a ledger (``backing`` set), a voucher counts as paid only as far as the chain backs it: what settled on the
client's channels to this node plus the client's reserve for this node (``nectar escrow reserve``), which no other
node can draw on and which cannot leave before the unlock delay (issue 20). Vouchers alone are promises: a client can
sign more than its escrow to several nodes, or withdraw before they settle. ``credit_limit`` stays the node's own
risk choice: the most a client may owe it beyond that backing (its unbacked allowance, also the lag between a
receipt and the voucher that pays it).

A private swarm names the clients whose vouchers it trusts (``TrustedClients``: ``--trusted-clients``, a file):
each of those may owe up to ``credit_limit`` on vouchers alone, with or without a ledger. Every other address is
served as a ledger node serves a client nothing backs: only out of the node-wide free allowance.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from eth_utils import is_address

from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as schema
from nectar.wire.messages import CLIENT_AUTH_MAX_SKEW_S, ZERO_ADDRESS
from nectar.wire.protocol import ErrorCode, NodeRPCError

logger = logging.getLogger(__name__)


class ReceiptSigner:
    """Builds and signs receipts for one node and model. Thread-safe (stateless apart from its key)."""

    def __init__(
        self,
        *,
        private_key: str,
        model_id: str,
        price_per_token: int,
        domain: dict,
        compute: fingerprints.ComputeSpec | None = None,
    ):
        self.private_key = private_key
        self.address = eip712.address_of(private_key)
        self.model_id = model_id
        self.model_hash = schema.model_id_hash(model_id)
        self.price_per_token = price_per_token
        self.domain = domain
        # how this node computes (dtype, quantization, device class): every output-carrying receipt commits to it,
        # so an audit recomputes in the same precision and judges with that precision's tolerance
        self.compute = compute or fingerprints.ComputeSpec()
        self.descriptor = self.compute.encode()
        self.descriptor_hash = fingerprints.fingerprint_hash(self.descriptor)
        self.empty_hash = fingerprints.fingerprint_hash(b"")

    def price_for(self, start: int, end: int) -> int:
        return self.price_per_token * (end - start)

    def sign(
        self,
        *,
        session_id: bytes,
        step: int,
        kind: schema.ReceiptKind,
        start: int,
        end: int,
        client: str,
        tokens: int,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        adapter: bytes | None = None,
    ) -> tuple[schema.SignedReceipt, bytes]:
        """``adapter``: the digest of the LoRA adapter the step was computed with (bound by its descriptor)."""
        descriptor, descriptor_hash = self.descriptor, self.descriptor_hash
        if adapter:
            descriptor = dataclasses.replace(self.compute, adapter=bytes(adapter)).encode()
            descriptor_hash = fingerprints.fingerprint_hash(descriptor)
        fingerprint = descriptor if outputs.ndim == 3 else b""
        price = self.price_for(start, end)
        receipt = schema.Receipt(
            session_id=session_id,
            step=step,
            kind=int(kind),
            model_id=self.model_hash,
            block_start=start,
            block_end=end,
            node=self.address,
            client=client,
            tokens=tokens,
            price=price,
            amount=tokens * price,
            input_commitment=fingerprints.commit_tensor(inputs),
            output_commitment=fingerprints.commit_tensor(outputs),
            fingerprint=descriptor_hash if fingerprint else self.empty_hash,
            timestamp=int(time.time()),
        )
        return eip712.sign_receipt(receipt, self.private_key, self.domain), fingerprint


class BackingCache:
    """What backs each client's vouchers to this node on chain (settled + reserve - pending release), asked of the
    ledger through ``fetch(client) -> int`` and kept ``ttl`` seconds. A fetch that fails keeps the last answer (0 for
    a client never seen): an unreachable ledger leaves clients their unbacked allowance, nothing more.

    ``get`` never blocks on a fresh entry; an expired one is refreshed in the background (a client's backing only
    shrinks through a release request, which takes the unlock delay: far longer than ``ttl``). ``refresh`` blocks
    (``fetch``'s own timeout) and is what a client short of credit waits for, at most once per ``min_interval``."""

    def __init__(
        self,
        fetch: Callable[[str], int],
        *,
        ttl: float = 10.0,
        min_interval: float = 0.5,
        unbacked_fetches_per_s: float = 20.0,
        max_entries: int = 100_000,
    ):
        self.fetch, self.ttl, self.min_interval = fetch, ttl, min_interval
        self._entries: dict[str, tuple[float, int]] = {}  # client -> (fetched at, backed wei)
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()
        # asking the ledger about clients nothing backs (new addresses are free to make) is rate-limited node-wide,
        # and the table is bounded: throwaway addresses cannot make the node hammer its ledger or fill its memory
        self.unbacked_fetches_per_s, self.max_entries = unbacked_fetches_per_s, max_entries
        self._tokens, self._tokens_at = unbacked_fetches_per_s, time.monotonic()
        self.skipped = 0  # fetches refused by that rate limit

    def get(self, client: str) -> int:
        with self._lock:
            at, value = self._entries.get(client, (None, 0))
            stale = at is None or time.monotonic() - at > self.ttl
            if stale and at is not None and client not in self._refreshing:
                self._refreshing.add(client)
                threading.Thread(target=self.refresh, args=(client,), name="backing-refresh", daemon=True).start()
        return value

    def _may_fetch_unbacked(self) -> bool:
        now = time.monotonic()
        rate = self.unbacked_fetches_per_s
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1:
            self.skipped += 1
            return False
        self._tokens -= 1
        return True

    def refresh(self, client: str) -> int:
        with self._lock:
            at, value = self._entries.get(client, (None, 0))
            if at is not None and time.monotonic() - at < self.min_interval:
                self._refreshing.discard(client)
                return value
            if value <= 0 and not self._may_fetch_unbacked():
                self._refreshing.discard(client)
                return value
        try:
            value = int(self.fetch(client))
        except Exception as e:  # the ledger or chain down, or a malformed answer: keep what we knew
            logger.warning(f"Could not read the on-chain backing of client {client} from the ledger: {e}")
        with self._lock:
            if client not in self._entries and len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))  # the oldest entry: it is refetched if needed
            self._entries[client] = (time.monotonic(), value)
            self._refreshing.discard(client)
        return value


class TrustedClients:
    """The client addresses whose vouchers this node trusts without checking escrow (a private swarm's clients):
    ``addresses`` (``--trusted-clients``) plus those in ``path`` (``--trusted-clients-file``: one address a line,
    ``#`` comments), which is reread when it changes (checked at most every ``recheck`` s) so an operator adds or
    removes a client without a restart. A file that no longer parses keeps the last good list (and says why)."""

    def __init__(self, addresses: Iterable[str] = (), path: Path | str | None = None, *, recheck: float = 2.0):
        self._fixed = frozenset(_parse_addresses(addresses, "--trusted-clients"))
        self.path, self.recheck = (Path(path) if path else None), recheck
        self._from_file: frozenset[str] = frozenset()
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        if self.path is not None:
            self._from_file = self._read()  # a bad file at start is an error, not a silent empty list

    @classmethod
    def parse(cls, text: str, path: Path | str | None = None) -> TrustedClients:
        """From a comma-separated option value and an optional file."""
        return cls([a for a in text.replace(" ", ",").split(",") if a], path)

    def __bool__(self) -> bool:
        return bool(self._fixed) or self.path is not None

    def __contains__(self, client: str) -> bool:
        client = client.lower()
        if client in self._fixed:
            return True
        if self.path is None:
            return False
        now = time.monotonic()
        if now - self._checked >= self.recheck:
            with self._lock:
                if now - self._checked >= self.recheck:
                    self._checked = now
                    self._reload()
        return client in self._from_file

    def _read(self) -> frozenset[str]:
        stat = self.path.stat()
        lines = (line.split("#", 1)[0].strip() for line in self.path.read_text().splitlines())
        addresses = frozenset(_parse_addresses([a for a in lines if a], str(self.path)))
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return addresses

    def _reload(self) -> None:
        try:
            stat = os.stat(self.path)
            if (stat.st_mtime_ns, stat.st_size) == self._stamp:
                return
            self._from_file = self._read()
            logger.info(f"Trusted clients reloaded from {self.path}: {len(self._from_file)} addresses")
        except (OSError, ValueError) as e:
            logger.error(f"Keeping the last list of trusted clients: could not read {self.path} ({e}); fix the file")


def _parse_addresses(addresses: Iterable[str], where: str) -> list[str]:
    bad = [a for a in addresses if not is_address(a)]
    if bad:
        raise ValueError(f"{where}: not an Ethereum address: {', '.join(bad[:3])} (expected 0x and 40 hex digits)")
    return [a.lower() for a in addresses]


class CreditLedger:
    """Per-client balance at this node: charged by receipts, paid by the highest cumulative voucher received, as far
    as the chain backs it when ``backing`` is given (see the module's docstring).

    With ``backing`` (a node with a ledger), credit is granted only against escrow the node checked (issue 22): all a
    client was charged here must stay within what backs it on chain (settled + its reserve for this node), and what
    its vouchers do not cover yet within ``credit_limit`` (the lag between a receipt and the voucher that pays it).
    A client nothing backs gets no credit of its own, only what is left of ``free`` (``FreeAllowance``: node-wide,
    so throwaway addresses cannot multiply it). ``trusted`` clients (a private swarm's, ``TrustedClients``) may owe
    up to ``credit_limit`` on vouchers alone; without ``backing`` nobody else gets more than ``free``."""

    def __init__(
        self,
        *,
        node_address: str,
        credit_limit: int,
        domain: dict,
        backing: BackingCache | None = None,
        free: FreeAllowance | None = None,
        trusted: TrustedClients | None = None,
    ):
        self.node_address = node_address
        self.trusted = trusted if trusted is not None else TrustedClients()
        self.credit_limit = credit_limit
        self.domain = domain
        self.backing = backing
        self.free = free or FreeAllowance(0)
        self._charged: dict[str, int] = defaultdict(int)
        self._free_used: dict[str, int] = defaultdict(int)  # charged here out of the free allowance
        self._paid: dict[tuple[str, str, int], int] = {}  # (client, partner, channel id) -> cumulative paid
        self._best_voucher: dict[tuple[str, str, int], schema.SignedVoucher] = {}
        self._lock = threading.Lock()
        self.vouchers_checked = 0  # signers recovered (the info RPC reports it)

    def vouched(self, client: str) -> int:
        return sum(v for (c, *_), v in self._paid.items() if c == client)

    def unpaid(self, client: str, *, backed: int | None = None) -> int:
        """What ``client`` owes beyond what counts as paid: its vouchers, capped by ``backed`` when given."""
        paid = self.vouched(client)
        if backed is not None:
            paid = min(paid, backed)
        return self._charged[client] - paid

    def owes_past_limit(self, client: str, cost: int) -> bool:
        """Whether ``cost`` more would take what ``client`` owes beyond its verified vouchers past the credit limit
        (where a voucher not checked yet would make the difference)."""
        return self.unpaid(client) - self._free_used.get(client, 0) + cost > self.credit_limit

    def _backed_ok(self, client: str, cost: int, backed: int) -> bool:
        charged = self._charged[client] - self._free_used[client]
        return charged + cost <= backed and self.unpaid(client, backed=backed) - self._free_used[client] + cost <= (
            self.credit_limit
        )

    def short(self, client: str, cost: int) -> bool:
        """Whether ``client`` lacks the backing for ``cost`` more as far as the node knows now (no ledger call): then
        the caller refreshes it off the event loop (``BackingCache.refresh``) before ``check_credit``."""
        return (
            self.backing is not None
            and cost > 0
            and client not in self.trusted
            and not self._backed_ok(client, cost, self.backing.get(client))
        )

    def _lagging(self, client: str, cost: int) -> NodeRPCError:
        return NodeRPCError(
            ErrorCode.CREDIT_LIMIT,
            f"client {client} owes {self.unpaid(client)} credit wei here and this step costs {cost}, above the "
            f"node's credit limit of {self.credit_limit}; send a voucher covering the receipts you received",
        )

    def check_credit(self, client: str, cost: int, *, opening: bool = False) -> bool:
        """Raises ``CREDIT_LIMIT`` unless ``client`` may be charged ``cost`` more here. ``opening``: only whether it
        could be now (an open reserves cache only for a client that can pay a step; nothing is taken). Returns
        whether it pays on credit of its own (backed escrow or trusted vouchers; also any free step) rather than
        out of the node-wide free allowance: its sessions' cache is then never reclaimed for another's. On a free
        node (``cost`` 0) that names trusted clients, the others' sessions likewise give way to theirs."""
        if not cost:
            return not self.trusted or client in self.trusted
        if client in self.trusted:
            if self.unpaid(client) + cost > self.credit_limit:
                raise self._lagging(client, cost)
            return True
        backed = 0
        if self.backing is not None:
            backed = self.backing.get(client)
            if self._backed_ok(client, cost, backed):
                return True
            backed = self.backing.refresh(client)  # short of credit: ask the chain (through the ledger) again
            if self._backed_ok(client, cost, backed):
                return True
        if opening and self.free.available(cost):
            return False  # its steps may come out of the free allowance, as long as it lasts
        if not opening and self.free.take(cost):
            with self._lock:
                self._free_used[client] += cost
            return False
        if self.backing is None:
            free = f" and {self.free.per_hour} credit wei an hour to everyone else" if self.free.per_hour else ""
            raise NodeRPCError(
                ErrorCode.CREDIT_LIMIT,
                f"payment required: node {self.node_address} serves paid work on credit only to the clients it "
                f"trusts{free}, and client {client} is not one of them (this step costs {cost}); ask the node's "
                "operator to add your address to --trusted-clients, or use nodes that check escrow (--ledger-url)",
            )
        unpaid = self.unpaid(client, backed=backed) - self._free_used[client]
        if backed > 0 and unpaid + cost > self.credit_limit and self.unpaid(client) + cost > self.credit_limit:
            raise self._lagging(client, cost)  # its vouchers lag: the usual case, not a backing one
        from nectar.wire.ledger_api import reserve_command  # httpx only for nodes with a ledger

        charged = self._charged[client] - self._free_used[client]
        raise NodeRPCError(
            ErrorCode.CREDIT_LIMIT,
            f"payment required: client {client}'s work at node {self.node_address} is backed on chain for {backed} "
            f"credit wei (settled + its reserve for this node); it was charged {charged} here and this step costs "
            f"{cost} (the node works only against escrow it checked); reserve escrow for this node, then retry: "
            f"{reserve_command(self.node_address)}",
        )

    def charge(self, client: str, amount: int) -> None:
        with self._lock:
            self._charged[client] += amount

    def accept_voucher(self, data: dict, expected_client: str) -> schema.SignedVoucher | None:
        """Verifies a voucher from the wire; returns it if it raised the paid amount, raises on a bad one."""
        signed = self.parse_voucher(data, expected_client)
        return None if signed is None else self.verify_voucher(signed, expected_client)

    def parse_voucher(self, data: dict, expected_client: str) -> schema.SignedVoucher | None:
        """A voucher from the wire with its fields checked against this node and the session's client, its signature
        not yet (``verify_voucher``); None where it pays nothing new on its channel (no signer recovered for it)."""
        try:
            signed = schema.SignedVoucher.from_json(data)
        except Exception as e:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"malformed voucher: {e}")
        voucher = signed.voucher
        if voucher.client.lower() != expected_client.lower():
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "voucher signature does not match the session's client")
        if voucher.node.lower() != self.node_address.lower():
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"voucher is for node {voucher.node}, not {self.node_address}")
        with self._lock:
            if voucher.cumulative_amount <= self._paid.get(_channel(voucher), 0):
                return None  # stale or repeated: harmless, nothing new paid
        return signed

    def verify_voucher(self, signed: schema.SignedVoucher, expected_client: str) -> schema.SignedVoucher | None:
        """Recovers a parsed voucher's signer; counts it as paid if the session's client signed it (else raises).
        Returns it if it raised the paid amount."""
        self.vouchers_checked += 1
        try:
            signer = eip712.recover_voucher_signer(signed, self.domain)
        except Exception as e:
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"malformed voucher: {e}")
        if signer.lower() != expected_client.lower():
            raise NodeRPCError(ErrorCode.BAD_REQUEST, "voucher signature does not match the session's client")
        key = _channel(signed.voucher)
        with self._lock:
            if signed.voucher.cumulative_amount <= self._paid.get(key, 0):
                return None
            self._paid[key] = signed.voucher.cumulative_amount
            self._best_voucher[key] = signed
        return signed

    def best_vouchers(self) -> list[schema.SignedVoucher]:
        with self._lock:
            return list(self._best_voucher.values())


def _channel(voucher: schema.Voucher) -> tuple[str, str, int]:
    return voucher.client, voucher.partner, voucher.channel_id  # the partner is part of the channel


class ClientVouchers:
    """A client's vouchers at this node, their signatures checked lazily (shared by its sessions: ``NodeSteps``).

    A client sends its newest cumulative voucher with every step, and recovering a voucher's signer costs about 0.1 ms
    of the event loop's CPU: a tenth of a busy node's loop time per step, though only the newest voucher of a channel
    ever matters. So each voucher's fields are checked as it comes (a malformed one, or one for another node or
    client, is refused at once), and only the newest per channel is kept (at most ``MAX_CHANNELS``); their signatures
    are checked when credit needs them (a step that the checked vouchers would refuse), at most ``interval`` s after
    the last check, when the client pays on leaving, and when one of its sessions ends.

    Until its signature is checked a voucher counts for nothing: credit is granted on checked vouchers only, so a
    client gets no more than before (``credit_limit`` beyond what is checked and backed). A voucher whose signature
    fails ends the session it came in (or the one that needed it) when it is checked."""

    MAX_CHANNELS = 4  # vouchers kept unchecked per client: one more channel has them all checked first

    def __init__(
        self,
        credit: CreditLedger,
        client: str,
        *,
        interval: float,
        accepted: Callable[[schema.SignedVoucher], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.credit, self.client, self.interval, self.accepted, self.clock = credit, client, interval, accepted, clock
        self.pending: dict[tuple[str, str, int], schema.SignedVoucher] = {}  # channel -> its newest, unchecked
        self._checked_at = clock()
        self.verified = 0  # signatures recovered (tests read it)
        self.sessions = 0  # its open sessions here (``NodeSteps`` forgets it at 0)

    def offer(self, data: dict | None) -> None:
        """A voucher from one of the client's streams: kept if it pays more than the one kept for its channel; the
        kept ones are checked now if the last check is ``interval`` old. Raises ``BAD_REQUEST`` for a malformed
        voucher (or a bad signature, when checked)."""
        if data is None:
            return
        signed = self.credit.parse_voucher(data, self.client)
        if signed is not None:
            channel = _channel(signed.voucher)
            kept = self.pending.get(channel)
            if kept is None and len(self.pending) >= self.MAX_CHANNELS:
                self.settle()  # bounded: the kept ones are checked now, never dropped
            if kept is None or signed.voucher.cumulative_amount > kept.voucher.cumulative_amount:
                self.pending[channel] = signed
        if self.pending and self.clock() - self._checked_at >= self.interval:
            self.settle()

    def settle(self) -> bool:
        """Checks the kept vouchers' signatures and counts them as paid; raises ``BAD_REQUEST`` at the first whose
        signer is not the client (the others stay kept). Returns whether there was one."""
        if not self.pending:
            return False
        self._checked_at = self.clock()
        while self.pending:
            signed = self.pending.pop(next(iter(self.pending)))
            self.verified += 1
            accepted = self.credit.verify_voucher(signed, self.client)
            if accepted is not None:
                self.accepted(accepted)
        return True

    def check_credit(self, cost: int) -> bool:
        """``CreditLedger.check_credit`` for a step of one of its sessions, the kept vouchers checked first if the
        checked ones leave too little credit for it (before any refresh from the ledger or draw on the free
        allowance)."""
        if self.pending and self.credit.owes_past_limit(self.client, cost):
            self.settle()
        return self.credit.check_credit(self.client, cost)

    def session_ended(self) -> None:
        """One of its sessions ended: the kept vouchers are counted if they check out (nothing to answer any more)."""
        self.sessions -= 1
        try:
            self.settle()
        except NodeRPCError as e:
            logger.info(f"Client {self.client}'s last voucher was refused as a session ended: {e}")
            self.pending.clear()


class ClientGate:
    """Who a signed open or billed call is from (issue 22): the address that signed it (``Open.signed``,
    ``ForwardCall.signed``) for this node's address and peer id, dated within ``max_skew`` of the node's clock, its
    nonce never seen before. The address a message names is only checked against that signer: nobody can be billed
    for another's work, and a call cannot be replayed at another node or later.

    Seen nonces are kept until they are stale anyway (``max_skew`` past their date), at most ``max_nonces`` of them:
    past that the node answers ``cache_full`` (busy) rather than forget one early."""

    def __init__(
        self,
        node_address: str,
        *,
        max_skew: float = CLIENT_AUTH_MAX_SKEW_S,
        max_nonces: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ):
        self.node_address, self.max_skew, self.max_nonces, self.clock = node_address, max_skew, max_nonces, clock
        self._seen: dict[bytes, float] = {}  # nonce -> when it may be forgotten (insertion order ~ date order)
        self._lock = threading.Lock()
        self.refused = 0
        self.verify_seconds = 0.0  # time spent recovering signers (benchmarks read it)

    def client_of(self, message, peer_id: str) -> str:
        """The verified client address of an ``Open``, ``ForwardCall`` or ``BackwardCall``; raises
        ``NodeRPCError(FORBIDDEN)`` for an unsigned, stale, replayed or mis-addressed one."""
        try:
            return self._check(message, peer_id)
        except NodeRPCError:
            self.refused += 1
            raise

    def _check(self, message, peer_id: str) -> str:
        auth = message.auth
        if auth is None:
            raise NodeRPCError(
                ErrorCode.FORBIDDEN,
                "unsigned request: this node serves only requests signed with the paying client's key (open and "
                "forward/backward calls, for this node's address and peer id); update the nectar client",
            )
        now = self.clock()
        if abs(now - auth.timestamp) > self.max_skew:
            raise NodeRPCError(
                ErrorCode.FORBIDDEN,
                f"stale signature: dated {auth.timestamp}, this node's clock says {int(now)} (more than "
                f"{self.max_skew:.0f}s apart); sign a fresh request and check your clock",
            )
        began = time.perf_counter()
        try:
            signer = message.signer(node=self.node_address, peer_id=peer_id)
        except (eip712.InvalidSignature, ValueError) as e:
            raise NodeRPCError(
                ErrorCode.FORBIDDEN, f"bad client signature ({e}); sign the request for this node's address and peer id"
            )
        finally:
            self.verify_seconds += time.perf_counter() - began
        claimed = message.client
        if claimed != ZERO_ADDRESS and claimed.lower() != signer.lower():
            raise NodeRPCError(
                ErrorCode.FORBIDDEN,
                f"the request names client {claimed} but is signed by {signer} (or for another node): a client is "
                "billed only as the key that signs; sign with the paying key",
            )
        with self._lock:
            while self._seen:
                nonce, forget_at = next(iter(self._seen.items()))
                if forget_at >= now:
                    break
                del self._seen[nonce]
            if auth.nonce in self._seen:
                raise NodeRPCError(ErrorCode.FORBIDDEN, "replayed request (its nonce was used already); sign afresh")
            if len(self._seen) >= self.max_nonces:
                raise NodeRPCError(ErrorCode.CACHE_FULL, "this node is busy (too many signed requests in flight)")
            self._seen[auth.nonce] = max(now, auth.timestamp) + self.max_skew + 1
        return signer


class FreeAllowance:
    """What a node gives clients that nothing backs, all of them together (issue 22): ``per_hour`` credit wei,
    refilled continuously up to one hour's worth. Shared by every unbacked address, so rotating throwaway
    addresses gets no more than one client would: the node's loss to unbacked clients is at most ``per_hour`` an
    hour (0, the default: none)."""

    def __init__(self, per_hour: int, *, clock: Callable[[], float] = time.monotonic):
        self.per_hour, self.clock = max(0, int(per_hour)), clock
        self._left, self._at = float(self.per_hour), clock()
        self._lock = threading.Lock()
        self.given = 0

    def _refill(self) -> None:
        now = self.clock()
        self._left = min(float(self.per_hour), self._left + (now - self._at) * self.per_hour / 3600)
        self._at = now

    def available(self, cost: int) -> bool:
        """Whether ``cost`` could be taken now (nothing is taken)."""
        if self.per_hour <= 0:
            return False
        with self._lock:
            self._refill()
            return cost <= self._left

    def take(self, cost: int) -> bool:
        if self.per_hour <= 0:
            return False
        with self._lock:
            self._refill()
            if cost > self._left:
                return False
            self._left -= cost
            self.given += cost
            return True
