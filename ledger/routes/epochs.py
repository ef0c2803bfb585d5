"""Epochs: list them, and (admin/dev) close the collecting one now instead of waiting for beat."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from nectar.ledger import crud
from nectar.ledger.deps import AdminDep, SessionDep, StateDep
from nectar.ledger.schemas import EpochPublic
from nectar.ledger.worker import ADVANCE_EPOCHS_TASK, producer_app
from nectar.wire.ledger_api import CLOSE_EPOCH, EPOCHS, PREFIX

logger = logging.getLogger(__name__)
router = APIRouter(prefix=PREFIX, tags=["epochs"])


def epoch_public(epoch) -> EpochPublic:
    return EpochPublic(
        number=epoch.number,
        status=epoch.status,
        receipt_count=epoch.receipt_count or 0,
        total_amount=str(epoch.total_amount or 0),
        root=None if epoch.root is None else "0x" + epoch.root.hex(),
        root_tx_hash=epoch.root_tx_hash,
        closed_at=epoch.closed_at and epoch.closed_at.isoformat(),
        settled_at=epoch.settled_at and epoch.settled_at.isoformat(),
        last_error=epoch.last_error,
    )


@router.get(EPOCHS, response_model=list[EpochPublic])
def epochs(session: SessionDep, limit: int = 50) -> list[EpochPublic]:
    crud.current_epoch(session)
    return [epoch_public(e) for e in crud.list_epochs(session, limit=min(limit, 500))]


@router.post(CLOSE_EPOCH)
def close_epoch(_: AdminDep, session: SessionDep, state: StateDep, allow_empty: bool = False) -> dict:
    """Freeze the collecting epoch now (in the database) and ask the worker to commit and settle it."""
    closed = crud.close_epoch(session, allow_empty=allow_empty)
    session.commit()
    task_id, error = None, None
    try:
        if state.celery is None:
            state.celery = producer_app(state.settings)
        task_id = state.celery.send_task(ADVANCE_EPOCHS_TASK).id
    except Exception as e:  # the epoch stays closed; beat or the next call enqueues the settlement
        error = f"could not reach the broker ({e}); the worker will settle on its next beat"
        logger.warning(error)
    return {
        "closed": None if closed is None else epoch_public(closed).model_dump(),
        "task_id": task_id,
        "enqueue_error": error,
    }
