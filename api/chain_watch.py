"""``ChainWatcher``: funds accounts from the chain and records settlements for the monitor.

Users fund their account with ``Escrow.depositFor(<gateway address>, amount)`` sent from the Ethereum address they
linked to it: the credit lands in the gateway's escrow (which pays the nodes) and the watcher credits the account
that owns the sending address. Each event is recorded under its (tx hash, log index), so a rescan, a restart or a
second API process never credits twice. Deposits from an address no account has linked yet wait, unassigned, and are
credited when an account links that address. On a devnet, ``faucet`` mints credits straight into the gateway's
escrow for an account.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Engine

from nectar.api import crud
from nectar.api.core.config import WEI_PER_CREDIT, WEI_PER_MICRO, Settings
from nectar.api.models import Deposit
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)

MAX_BLOCK_RANGE = 5000  # blocks per event query


@dataclass
class ScanResult:
    credited: int = 0  # deposits credited to an account
    unassigned: int = 0  # deposits from addresses no account has linked
    settled_batches: int = 0
    reserved: int = 0  # nodes whose reserve the scan topped up
    to_block: int | None = None


class ChainUnavailable(RuntimeError):
    """No deployment file or no answer from its RPC; the message says which."""


class ChainWatcher:
    """Thread-safe; ``scan()`` is called periodically by the app and on demand by ``POST /v1/account/deposits/scan``.

    :param settings: the API settings (deployment path, confirmations)
    :param engine: the API database
    :param gateway_key: the gateway's wallet key (owner of the escrow that deposits go to)
    """

    def __init__(self, settings: Settings, engine: Engine, *, gateway_key: str | None):
        from eth_account import Account

        self.settings, self.engine, self.gateway_key = settings, engine, gateway_key
        self.gateway = Account.from_key(gateway_key).address if gateway_key else None
        self._lock = threading.Lock()
        self._chain = None
        self._stamp = None

    def chain(self):
        """The Chain of the current deployment file (reloaded when the file changes, e.g. a restarted devnet)."""
        from nectar.chain import Chain, load_deployment

        path = self.settings.deployment_path
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            raise ChainUnavailable(
                f"no deployment file at {path}: start `nectar devnet` or set NECTAR_API_DEPLOYMENT_PATH"
            ) from None
        if self._chain is None or stamp != self._stamp:
            self._chain, self._stamp = Chain(load_deployment(path)), stamp
        return self._chain

    def deposit_instructions(self) -> dict:
        chain = self.chain()
        return {
            "chain_id": chain.chain_id,
            "rpc_url": chain.rpc_url,
            "escrow": chain.address_of("Escrow"),
            "credits_token": chain.address_of("Credits"),
            "gateway_address": self.gateway,
        }

    # ---- scanning ----------------------------------------------------------------------------------------------

    def scan(self) -> ScanResult:
        if self.gateway is None:
            raise ChainUnavailable("the gateway has no wallet key (NECTAR_API_PRIVATE_KEY), so it has no escrow")
        with self._lock:
            chain = self.chain()
            try:
                head = chain.block_number() - self.settings.deposit_confirmations
            except Exception as e:
                raise ChainUnavailable(f"the chain at {chain.rpc_url} does not answer ({e})") from None
            result = ScanResult(to_block=head)
            escrow = chain.address_of("Escrow")
            start = chain.deployment.deployed_at_block
            self._scan_stream("deposits", chain, escrow, start, head, lambda a, b: self._deposits(chain, a, b, result))
            self._scan_stream(
                "settlements", chain, escrow, start, head, lambda a, b: self._settlements(chain, a, b, result)
            )
            result.reserved = self._keep_reserves(chain)
            if result.credited or result.settled_batches:
                logger.info(
                    f"Chain scan to block {head}: {result.credited} deposit(s) credited, "
                    f"{result.unassigned} unassigned, {result.settled_batches} settled batch(es)"
                )
            return result

    def _keep_reserves(self, chain) -> int:
        """Tops up the gateway's reserve for each node it may route to (the ledger's ranking, best first) to
        ``reserve_per_node``: nodes count the gateway's vouchers as paid only as far as the chain backs them. Keeps at
        least as much free as it reserves each time, so deposits still pay every other node. Returns how many it
        topped up; a ledger or chain that does not answer is logged and retried at the next scan."""
        target, limit = self.settings.reserve_per_node, self.settings.reserve_max_nodes
        if not target or not limit or not self.settings.ledger_url or not self.gateway_key:
            return 0
        from nectar.wire.ledger_api import LedgerClient

        try:
            with LedgerClient(self.settings.ledger_url, timeout=5.0) as ledger:
                ranked = [str(n["address"]) for n in ledger.reputation()]
                # then staked nodes that served nothing yet: nodes work only against checked escrow (issue 22), so
                # a node the ranking does not list yet would otherwise never be reserved for, and never used
                known = {a.lower() for a in ranked}
                staked = [n.address for n in ledger.stakes().nodes.values() if n.eligible]
                nodes = (ranked + [a for a in staked if a.lower() not in known])[:limit]
            topped = 0
            for node in nodes:
                held = chain.reserve_of(self.gateway, node)
                short = target - (held["amount"] - held["pendingRelease"])
                if short <= 0:
                    continue
                free = chain.escrow_balance(self.gateway)
                if free < 2 * short:
                    logger.warning(
                        f"Gateway escrow has {free} credit wei free: too little to reserve {short} more for node "
                        f"{node} (nodes extend only their unbacked credit limit without it); deposit into the "
                        f"gateway's escrow"
                    )
                    break
                chain.reserve(self.gateway_key, node, short)
                logger.info(f"Reserved {short} credit wei of the gateway's escrow for node {node}")
                topped += 1
            return topped
        except Exception as e:
            logger.warning(f"Could not top up the gateway's reserves ({type(e).__name__}: {e}); retrying next scan")
            return 0

    def _scan_stream(self, name: str, chain, escrow: str, start: int, head: int, handle) -> None:
        with session_scope(self.engine) as session:
            begin = crud.get_cursor(
                session, name=name, chain_id=chain.chain_id, escrow=escrow, start_block=start
            ).next_block
        while begin <= head:
            end = min(head, begin + MAX_BLOCK_RANGE - 1)
            handle(begin, end)
            with session_scope(self.engine) as session:
                crud.get_cursor(
                    session, name=name, chain_id=chain.chain_id, escrow=escrow, start_block=start
                ).next_block = end + 1
            begin = end + 1

    def _deposits(self, chain, begin: int, end: int, result: ScanResult) -> None:
        events = chain.events("Escrow", "Deposited", from_block=begin, to_block=end, filters={"client": self.gateway})
        for event in events:
            depositor = chain.w3.eth.get_transaction(event["txHash"])["from"]
            if depositor.lower() == self.gateway.lower():
                continue  # the gateway funding itself (the devnet faucet path records its own deposits)
            amount_wei = int(event["args"]["amount"])
            with session_scope(self.engine) as session:
                account = crud.account_by_address(session, address=depositor)
                deposit = crud.add_credit(
                    session,
                    account_id=account.id if account else None,
                    amount=amount_wei // WEI_PER_MICRO,
                    source="chain",
                    depositor=depositor,
                    tx_hash=event["txHash"],
                    log_index=event["logIndex"],
                    block_number=event["blockNumber"],
                    amount_wei=amount_wei,
                )
            if deposit is not None:
                if account is None:
                    result.unassigned += 1
                    logger.warning(
                        f"Deposit of {amount_wei} wei from {depositor} (tx {event['txHash']}) matches no "
                        f"account yet; it is credited when an account links that address"
                    )
                else:
                    result.credited += 1

    def _settlements(self, chain, begin: int, end: int, result: ScanResult) -> None:
        events = chain.events("Settlement", "BatchSettled", from_block=begin, to_block=end)
        times: dict[int, datetime] = {}
        for event in events:
            block = event["blockNumber"]
            if block not in times:
                stamp = chain.w3.eth.get_block(block)["timestamp"]
                times[block] = datetime.fromtimestamp(stamp, UTC)
            args = event["args"]
            with session_scope(self.engine) as session:
                if crud.record_settled_batch(
                    session,
                    tx_hash=event["txHash"],
                    log_index=event["logIndex"],
                    block_number=block,
                    settled_at=times[block],
                    gross_wei=int(args["gross"]),
                    fee_wei=int(args["fee"]),
                    vouchers=int(args["vouchers"]),
                ):
                    result.settled_batches += 1

    # ---- devnet faucet -----------------------------------------------------------------------------------------

    def faucet(self, *, account_id: int, credits: Decimal) -> Deposit:
        """Devnet only: mints ``credits`` to the gateway, deposits them into its escrow, credits the account."""
        if self.gateway_key is None:
            raise ChainUnavailable("the gateway has no wallet key (NECTAR_API_PRIVATE_KEY)")
        amount_wei = int(credits * WEI_PER_CREDIT)
        with self._lock:
            chain = self.chain()
            chain.faucet(self.gateway, amount_wei, private_key=self.gateway_key)
            tx = chain.deposit(self.gateway_key, amount_wei)
        event = tx.events_named("Deposited")[0]
        with session_scope(self.engine) as session:
            return crud.add_credit(
                session,
                account_id=account_id,
                amount=amount_wei // WEI_PER_MICRO,
                source="faucet",
                depositor=self.gateway,
                tx_hash=tx.tx_hash,
                log_index=event["logIndex"],
                block_number=tx.block_number,
                amount_wei=amount_wei,
                note="devnet faucet",
            )
