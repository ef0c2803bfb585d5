"""Moves closed epochs to ``settled`` on chain: commit the receipts root, then settle vouchers in batches.

Each step first asks the chain whether it already happened (``epoch_info``, ``paid``), so a worker killed anywhere
and restarted neither skips nor repeats a payment. Called by the Celery tasks (``tasks.py``) and by tests directly.

Roots go on chain in epoch order (the contract takes only ``latest_epoch + 1``): an epoch without receipts is committed
as (zero root, 0) so the next can follow, and epochs the chain lacks before this one are committed first from the
database. A root on chain that differs from the database's is corrected while its challenge period runs.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from pathlib import Path

from sqlalchemy import Engine

from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.models import Epoch, EpochStatus, Settlement, SettlementStatus, utcnow
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)
RECHECK_CLIENTS = 50  # clients of retired vouchers whose escrow is read again per run (bounds the chain calls)


def crash_point(settings: Settings, name: str) -> None:
    """Testing hook: at the configured stage, leave a marker file and stall so a test can kill -9 the worker here."""
    if settings.crash_point != name:
        return
    marker = Path(settings.crash_marker).with_suffix(f".{name}")
    marker.write_text(str(os.getpid()))
    logger.warning(f"Stalling at crash point {name!r} (pid {os.getpid()}) until killed")
    while True:
        time.sleep(1)


def _chain_error_name(error: Exception) -> str:
    return getattr(error, "name", None) or getattr(error, "error_name", None) or type(error).__name__


class EpochSettler:
    """Drives every unfinished epoch through closed -> root_committed -> settled.

    :param settings: the ledger settings (operator key, batch size, lease length, crash point)
    :param engine: the ledger database
    :param chain: a ``nectar.chain.Chain`` (or anything with the same methods)
    """

    def __init__(self, settings: Settings, engine: Engine, chain):
        self.settings, self.engine, self.chain = settings, engine, chain
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.blocked = False  # set when another worker's (possibly dead) lease held an epoch: retry after it lapses

    def run(self, *, close: bool = True) -> list[int]:
        """Close the collecting epoch (if asked and there is anything in it), then advance every unfinished epoch.
        Retired vouchers (refused on chain for want of escrow) count as something only once their client has funds."""
        self._requeue_funded()
        if close:
            with session_scope(self.engine) as session:
                crud.close_epoch(session)
        advanced = []
        with session_scope(self.engine) as session:
            numbers = [e.number for e in crud.unfinished_epochs(session)]
        for number in numbers:  # in order: a later epoch never settles a channel before an earlier one
            if not self._claim(number):
                logger.info(f"Epoch {number} is leased by another worker (or a crashed one); retrying after the lease")
                self.blocked = True
                break
            try:
                finished = self._advance(number)
            finally:
                with session_scope(self.engine) as session:
                    crud.release_epoch_lease(session, epoch=number, owner=self.owner)
            advanced.append(number)
            if not finished:
                break
        return advanced

    def _requeue_funded(self) -> None:
        """Puts a retired voucher back in the queue once the chain would pay on it: its client's free escrow covers
        its rise, or the client holds a reserve for its node (drawn on in part). A client keeping a token balance
        below what it owes keeps its vouchers retired. At most ``RECHECK_CLIENTS`` clients are read per run."""
        with session_scope(self.engine) as session:
            owed: dict[str, list[tuple[int, str, int]]] = {}
            for v in crud.retired_vouchers(session):
                owed.setdefault(v.client, []).append((v.id, v.node, v.cumulative_amount - v.settled_amount))
        ready = []
        for client in random.sample(sorted(owed), min(len(owed), RECHECK_CLIENTS)):
            try:
                free = int(self.chain.escrow_balance(client))
                for voucher_id, node, rise in owed[client]:
                    if free >= rise or int(self.chain.reserve_of(client, node)["amount"]) > 0:
                        ready.append(voucher_id)
            except Exception as e:  # chain unreachable: they stay retired until the next run
                logger.warning(f"Could not read the escrow of {client} ({type(e).__name__}: {e}); retrying next run")
                return
        if ready:
            with session_scope(self.engine) as session:
                crud.requeue_retired(session, voucher_ids=ready)
            logger.info(f"{len(ready)} retired voucher(s) whose client has funds again go back in the queue")

    def _claim(self, number: int) -> bool:
        with session_scope(self.engine) as session:
            return crud.acquire_epoch_lease(
                session, epoch=number, owner=self.owner, seconds=self.settings.epoch_lease_seconds
            )

    def _advance(self, number: int) -> bool:
        with session_scope(self.engine) as session:
            epoch = session.get(Epoch, number)
            status, root, count = epoch.status, epoch.root, epoch.receipt_count
        if status == EpochStatus.CLOSED:
            self._commit_root(number, root, count)
        return self._settle(number)

    def _commit_root(self, number: int, root: bytes, count: int) -> None:
        root = bytes(root or bytes(32))  # an epoch of vouchers only: (zero root, 0) keeps the sequence going
        info = self.chain.epoch_info(number)
        tx_hash = None
        if info["committedAt"] and (bytes(info["root"]), int(info["count"])) == (root, count):
            logger.info(f"Epoch {number}: root already on chain (an earlier run committed it)")
        elif info["committedAt"]:
            tx_hash = self._correct_root(number, root, count, info)
        else:
            self._commit_missing_before(number)
            crash_point(self.settings, "before_commit_root")
            result = self.chain.commit_epoch_root(self.settings.key_for("ledger"), number, root, count)
            tx_hash = _tx_hash_hex(result)
            crash_point(self.settings, "after_commit_root")
            logger.info(f"Epoch {number}: root 0x{root.hex()} committed over {count} receipts (tx {tx_hash})")
        with session_scope(self.engine) as session:
            epoch = session.get(Epoch, number)
            epoch.status = EpochStatus.ROOT_COMMITTED
            epoch.root_tx_hash = tx_hash or epoch.root_tx_hash
            epoch.spot_seed = None

    def _correct_root(self, number: int, root: bytes, count: int, info: dict) -> str | None:
        """The chain holds another root for this epoch (e.g. the database was restored after a commit): replace it
        while the challenge period runs; a final root cannot change, so then the database is not this chain's."""
        on_chain = bytes(info["root"])
        if self.chain.chain_time() >= int(info["finalAt"]):
            raise RuntimeError(
                f"Epoch {number} has a different, final root on chain (0x{on_chain.hex()}) than in the ledger "
                f"database (0x{root.hex()}): the database does not belong to this deployment; point the ledger at its "
                f"own DB"
            )
        result = self.chain.correct_epoch_root(self.settings.key_for("ledger"), number, root, count)
        logger.warning(
            f"Epoch {number}: corrected the root on chain from 0x{on_chain.hex()} to the database's 0x{root.hex()} "
            f"({count} receipts) within its challenge period (tx {_tx_hash_hex(result)})"
        )
        return _tx_hash_hex(result)

    def _commit_missing_before(self, number: int) -> None:
        """Epochs go on chain in order: commit, from the database, any epoch before ``number`` the chain lacks (one an
        older ledger left out because it was empty, say)."""
        for missing in range(self.chain.latest_epoch() + 1, number):
            with session_scope(self.engine) as session:
                epoch = session.get(Epoch, missing)
                found = epoch is not None and epoch.status != EpochStatus.COLLECTING
                root, count = (bytes(epoch.root or bytes(32)), int(epoch.receipt_count or 0)) if found else (None, 0)
            if root is None:
                raise RuntimeError(
                    f"The chain expects epoch {missing} before {number}, and the ledger database has no closed epoch "
                    f"{missing}: the database does not belong to this deployment; point the ledger at its own DB"
                )
            result = self.chain.commit_epoch_root(self.settings.key_for("ledger"), missing, root, count)
            logger.warning(f"Epoch {missing}: committed late, before epoch {number} (tx {_tx_hash_hex(result)})")

    def _settle(self, number: int) -> bool:
        with session_scope(self.engine) as session:
            batches = [
                s.id
                for s in crud.prepare_settlements(session, epoch=number, batch_size=self.settings.settle_batch_size)
            ]
        for batch_id in batches:
            self._settle_batch(batch_id)
            self._claim(number)  # renew the lease between transactions
        with session_scope(self.engine) as session:
            statuses = [s.status for s in crud.list_settlements(session, epoch=number)]
            if all(s in (SettlementStatus.CONFIRMED, SettlementStatus.FAILED) for s in statuses):
                epoch = session.get(Epoch, number)
                epoch.status, epoch.settled_at = EpochStatus.SETTLED, utcnow()
                logger.info(f"Epoch {number} settled in {len(statuses)} transaction(s)")
                return True
        return False

    def _unpaid_items(self, batch_id: int) -> list:
        """Items of the batch the chain has not paid yet; those it has are recorded as paid (crash recovery)."""
        with session_scope(self.engine) as session:
            items = [i for i in crud.settlement_items(session, settlement_id=batch_id) if i.status == "pending"]
            unpaid = []
            for item in items:
                paid = int(self.chain.paid(item.client, item.node, item.channel_id, item.partner))
                if paid >= item.cumulative_amount:
                    crud.mark_item_paid(session, item=item, paid_on_chain=paid, limits=self.settings.work_limits)
                else:
                    unpaid.append(item)
            return unpaid

    def _settle_batch(self, batch_id: int) -> None:
        with session_scope(self.engine) as session:
            settlement = session.get(Settlement, batch_id)
            if settlement.status in (SettlementStatus.CONFIRMED, SettlementStatus.FAILED):
                return
        unpaid = self._unpaid_items(batch_id)
        if unpaid:
            with session_scope(self.engine) as session:  # recorded before sending: a restart re-checks chain.paid
                settlement = session.get(Settlement, batch_id)
                settlement.status, settlement.attempts = SettlementStatus.SENT, settlement.attempts + 1
            crash_point(self.settings, "before_settle")
            pairs = [(_voucher_message(item), bytes(item.signature)) for item in unpaid]
            try:
                result = self.chain.settle(self.settings.key_for("ledger"), pairs)
            except Exception as e:
                if not _is_revert(e):
                    raise  # connection trouble: the task retries later; chain.paid decides what is still due
                logger.warning(
                    f"Settlement batch {batch_id} reverted ({_chain_error_name(e)}); settling items one by one"
                )
                self._settle_individually(batch_id, unpaid)
                return
            crash_point(self.settings, "after_settle")
            self._record_result(batch_id, result)
            errors = self._record_skips(unpaid, result)
            if errors:
                self._confirm(batch_id, errors)
                self._log_unsettled(errors)
                return
        self._confirm(batch_id)

    def _confirm(self, batch_id: int, errors: list[str] | None = None) -> None:
        still_unpaid = [i for i in self._unpaid_items(batch_id) if errors is None or i.status != "skipped"]
        with session_scope(self.engine) as session:
            settlement = session.get(Settlement, batch_id)
            if still_unpaid:
                settlement.last_error = f"{len(still_unpaid)} voucher(s) not paid after the transaction; will retry"
            else:
                settlement.status = SettlementStatus.FAILED if errors else SettlementStatus.CONFIRMED
                settlement.last_error = "\n".join(errors) if errors else None
        if still_unpaid:
            raise RuntimeError(f"Settlement batch {batch_id}: {len(still_unpaid)} voucher(s) unpaid after sending")

    def _record_result(self, batch_id: int, result) -> None:
        with session_scope(self.engine) as session:
            settlement = session.get(Settlement, batch_id)
            settlement.tx_hash = _tx_hash_hex(result)
            settlement.gas_used = getattr(result, "gas_used", None)
            settlement.block_number = getattr(result, "block_number", None)
        logger.info(f"Settlement batch {batch_id}: tx {_tx_hash_hex(result)}, gas {getattr(result, 'gas_used', '?')}")

    def _record_skips(self, items: list, result) -> list[str]:
        """Reads the vouchers the contract skipped (``result.skipped``, from the receipt's ``VoucherSkipped`` events;
        ``voucher`` indexes ``items``, the list sent). One the client's escrow no longer covers is marked ``skipped``
        and returned as an error; one already paid at or above its amount (front-run: someone else settled it first,
        or a replay) is left to ``_unpaid_items``, which records the amount the chain paid."""
        errors = []
        for skip in getattr(result, "skipped", None) or []:
            item = items[skip["voucher"]]
            where = f"{item.client}->{item.node}#{item.channel_id}"
            if skip["reason"] == "AlreadySettled":
                logger.warning(f"Voucher {where} skipped on chain: already settled by another transaction")
                continue
            errors.append(f"{where}: skipped on chain: {skip['reason']}")
            with session_scope(self.engine) as session:
                session.get(type(item), item.id).status = "skipped"
        return errors

    @staticmethod
    def _log_unsettled(errors: list[str]) -> None:
        for error in errors:
            logger.error(f"Voucher not settled, retired until its client has funds or sends a higher voucher: {error}")

    def _settle_individually(self, batch_id: int, items: list) -> None:
        errors = []
        for item in items:
            try:
                result = self.chain.settle(
                    self.settings.key_for("ledger"), [(_voucher_message(item), bytes(item.signature))]
                )
                self._record_result(batch_id, result)
                errors.extend(self._record_skips([item], result))
            except Exception as e:
                if not _is_revert(e):
                    raise
                errors.append(f"{item.client}->{item.node}#{item.channel_id}: {_chain_error_name(e)}: {e}")
                with session_scope(self.engine) as session:
                    crud_item = session.get(type(item), item.id)
                    crud_item.status = "skipped"
        self._confirm(batch_id, errors)
        self._log_unsettled(errors)


def _voucher_message(item) -> dict:
    return {
        "client": item.client,
        "node": item.node,
        "partner": item.partner,
        "channelId": int(item.channel_id),
        "cumulativeAmount": int(item.cumulative_amount),
    }


def _tx_hash_hex(result) -> str | None:
    tx_hash = getattr(result, "tx_hash", None)
    if tx_hash is None:
        return None
    if isinstance(tx_hash, (bytes, bytearray)):
        return "0x" + bytes(tx_hash).hex()
    return str(tx_hash) if str(tx_hash).startswith("0x") else "0x" + str(tx_hash)


def _is_revert(error: Exception) -> bool:
    try:
        from nectar.chain import ChainError
    except ImportError:  # pragma: no cover - chain package not installed
        return False
    return isinstance(error, ChainError)


def settle_exiting_clients(settings: Settings, engine: Engine, chain, cursor_path: Path) -> int:
    """Settles at once the vouchers of clients that asked for escrow back (``WithdrawalRequested``, or
    ``ReserveReleaseRequested`` for a node's reserve) since the last look: nodes must be paid before the unlock delay
    lets the credits go. Closes the collecting epoch early and settles every unfinished epoch (the crash-safe path,
    ``EpochSettler``). Returns how many such requests had vouchers outstanding. ``cursor_path`` keeps the next block
    to read (per deployment); without it the watcher reads from the deployment's first block."""
    import json

    first = int(getattr(chain.deployment, "deployed_at_block", 0) or 0)
    # a devnet restarted redeploys at the same address: the deployment block's hash tells the two chains apart
    key = f"{chain.address_of('Settlement')}@{bytes(chain.w3.eth.get_block(first)['hash']).hex()}"
    try:
        cursor = json.loads(cursor_path.read_text())
    except (OSError, ValueError):
        cursor = {}
    start = int(cursor.get(key, first))
    latest = int(chain.block_number())
    if latest < start:
        return 0
    requests = chain.exit_requests_since(start, latest)
    urgent = 0
    with session_scope(engine) as session:
        for request in requests:
            vouchers = crud.list_vouchers(session, client=request["client"], node=request["node"])
            if any(v.cumulative_amount > v.settled_amount for v in vouchers):
                urgent += 1
                what = "reserve release for " + request["node"] if request["node"] else "withdrawal"
                logger.warning(
                    f"Client {request['client']} asked for a {what} of {request['amount']} (unlock at "
                    f"{request['unlockAt']}) with vouchers unsettled: settling now"
                )
    if urgent:
        EpochSettler(settings, engine, chain).run(close=True)
    cursor[key] = latest + 1  # only once settled: a crash reads these requests again
    cursor_path.parent.mkdir(parents=True, exist_ok=True)
    cursor_path.write_text(json.dumps(cursor))
    return urgent
