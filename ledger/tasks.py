"""Celery tasks of the ledger. Each is idempotent: it re-reads the database and the chain, so a redelivery is safe."""

from __future__ import annotations

import json
import logging
import sys
from functools import lru_cache

from celery import current_app, shared_task
from celery.exceptions import Retry
from celery.signals import worker_process_shutdown

from nectar.ledger import crud
from nectar.ledger.core.config import Settings, get_settings
from nectar.ledger.models import Epoch
from nectar.ledger.settlement import EpochSettler, settle_exiting_clients
from nectar.ledger.worker import (
    ADVANCE_EPOCHS_TASK,
    CLOSE_EPOCH_TASK,
    FINALIZE_SLASHES_TASK,
    REFRESH_STAKES_TASK,
    SLASH_CONFLICTS_TASK,
    SPOT_CHECK_TASK,
    WATCH_EXITS_TASK,
)
from nectar.service.db import get_engine, session_scope
from nectar.wire.receipts import SignedReceipt

logger = logging.getLogger(__name__)


def _settings() -> Settings:
    """The Settings the worker was built with (``create_celery``: the command's flags and environment, read once),
    else this process's environment (a task run outside a worker)."""
    return current_app.conf.get("nectar_settings") or get_settings()


@worker_process_shutdown.connect
def _leave_swarm(**_) -> None:
    """A pool process that joined the swarm for spot checks leaves it, or its DHT peer would hold the exit up."""
    module = sys.modules.get("nectar.ledger.swarm_audit")
    if module is not None:
        module.close_views()


@lru_cache(maxsize=1)
def _chain():
    from nectar.chain import Chain

    settings = _settings()
    if not settings.deployment_path.exists():
        raise RuntimeError(f"no deployment file at {settings.deployment_path}: start `nectar devnet` (or deploy) first")
    chain = Chain.from_deployment(settings.deployment_path)
    settings.check_unlock_delay(chain.unlock_delay())  # else clients could withdraw before settlement
    return chain


def _engine():
    return get_engine(_settings().database_url)


def _run_settler(task, close: bool) -> list[int]:
    settings = _settings()
    settler = EpochSettler(settings, _engine(), _chain())
    try:
        done = settler.run(close=close)
        if done and settings.audit_source:  # spot checks pick from the committed root: run them now, not at beat
            spot_check_epochs.delay()
        if settler.blocked:  # a killed worker's lease: come back when it has lapsed instead of waiting for beat
            raise task.retry(countdown=settings.epoch_lease_seconds + 1, max_retries=20)
        return done
    except Retry:
        raise
    except Exception as e:
        with session_scope(_engine()) as session:
            for epoch in crud.unfinished_epochs(session):
                epoch.last_error = f"{type(e).__name__}: {e}"
                break
        raise


@shared_task(name=CLOSE_EPOCH_TASK, acks_late=True, bind=True)
def close_epoch(self) -> list[int]:
    """Beat: close the collecting epoch (if anything is in it) and push every unfinished epoch forward."""
    return _run_settler(self, close=True)


@shared_task(name=ADVANCE_EPOCHS_TASK, acks_late=True, bind=True)
def advance_epochs(self) -> list[int]:
    """Push closed epochs forward without closing a new one (enqueued by ``POST /v1/epochs/close``)."""
    return _run_settler(self, close=False)


@shared_task(name=WATCH_EXITS_TASK, acks_late=True)
def watch_exits() -> int:
    """Beat: settle at once the vouchers of clients that asked to withdraw escrow or release a reserve."""
    from nectar.paths import nectar_home

    settings = _settings()
    return settle_exiting_clients(settings, _engine(), _chain(), nectar_home() / "ledger-exit-cursor.json")


@shared_task(name=SLASH_CONFLICTS_TASK, acks_late=True)
def slash_conflicts() -> int:
    """Submit stored double-sign evidence on chain; a conflict already slashed on chain is marked done."""
    settings, engine, chain = _settings(), _engine(), _chain()
    with session_scope(engine) as session:
        pending = [
            (c.id, c.receipt_id, c.other_receipt, c.node) for c in crud.list_conflicts(session, status="pending")
        ]
    done = 0
    for conflict_id, receipt_id, other_json, node in pending:
        with session_scope(engine) as session:
            from nectar.ledger.models import Receipt

            first = crud.signed_receipt_of(session.get(Receipt, receipt_id))
        second = SignedReceipt.from_json(json.loads(other_json))
        status, tx_hash, error = "slashed", None, None
        try:
            result = chain.slash_double_sign(
                settings.key_for("ledger"),
                first.receipt.to_message(),
                first.signature,
                second.receipt.to_message(),
                second.signature,
            )
            tx_hash = getattr(result, "tx_hash", None)
        except Exception as e:
            name = getattr(e, "error_name", None) or str(e)
            if "Already" not in name:
                status, error = "failed", f"{type(e).__name__}: {e}"
                logger.error(f"Slashing {node} for conflict {conflict_id} failed: {error}")
        with session_scope(engine) as session:
            from nectar.ledger.models import Conflict

            conflict = session.get(Conflict, conflict_id)
            conflict.status, conflict.last_error = status, error
            conflict.slash_tx_hash = (
                tx_hash if isinstance(tx_hash, str) or tx_hash is None else "0x" + bytes(tx_hash).hex()
            )
            if status == "slashed":
                crud.record_slash(session, node=node)
                done += 1
    return done


@shared_task(name=SPOT_CHECK_TASK, acks_late=True)
def spot_check_epochs() -> int:
    """Re-execute a secret random fraction of every committed epoch's receipts (needs an audit source configured)."""
    from nectar.ledger.spot_check import SpotChecker
    from nectar.ledger.verifiers import load_audit_source, make_verifiers
    from nectar.wire.eip712 import address_of

    settings = _settings()
    audit = load_audit_source(settings)
    if audit is None:
        return 0
    checker = SpotChecker(
        settings=settings,
        engine=_engine(),
        verifiers=make_verifiers(settings),
        audit=audit,
        chain=_chain(),
        skip_clients=[address_of(settings.key_for("verifier"))],
    )
    with session_scope(_engine()) as session:
        numbers = [
            e.number
            for e in crud.list_epochs(session, limit=20)
            if e.status in ("root_committed", "settled") and e.spot_seed is None
        ]
    return sum(checker.check_epoch(number).checked for number in sorted(numbers))


@shared_task(name=FINALIZE_SLASHES_TASK, acks_late=True)
def finalize_slashes() -> int:
    """Re-send missing spot-check attestations and slash the cases whose dispute window has passed."""
    from nectar.ledger.slashing import finalize_spot_check_slashes

    return finalize_spot_check_slashes(_settings(), _engine(), _chain()).slashed


@shared_task(name=REFRESH_STAKES_TASK, acks_late=True)
def refresh_stakes() -> int:
    chain = _chain()
    with session_scope(_engine()) as session:
        nodes = crud.list_nodes(session)
        for node in nodes:
            crud.set_stake(session, node=node.address, stake=int(chain.stake_of(node.address)))
    return len(nodes)


__all__ = [
    "close_epoch",
    "advance_epochs",
    "slash_conflicts",
    "spot_check_epochs",
    "finalize_slashes",
    "refresh_stakes",
    "watch_exits",
    "Epoch",
]
