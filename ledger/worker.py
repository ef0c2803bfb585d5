"""Builds the ledger's Celery app from Settings. Producers (the HTTP service) enqueue by task name only."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import Celery

from nectar.ledger.core.config import Settings, get_settings
from nectar.paths import nectar_home
from nectar.service import celery_app

logger = logging.getLogger(__name__)

CLOSE_EPOCH_TASK = "nectar.ledger.close_epoch"
ADVANCE_EPOCHS_TASK = "nectar.ledger.advance_epochs"
SLASH_CONFLICTS_TASK = "nectar.ledger.slash_conflicts"
SPOT_CHECK_TASK = "nectar.ledger.spot_check_epochs"
REFRESH_STAKES_TASK = "nectar.ledger.refresh_stakes"
FINALIZE_SLASHES_TASK = "nectar.ledger.finalize_slashes"
WATCH_EXITS_TASK = "nectar.ledger.watch_exits"


def producer_app(settings: Settings) -> Celery:
    """An app that can only send tasks (no task code imported)."""
    return celery_app.producer_app("nectar-ledger", settings)


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = celery_app.worker_app(
        "nectar-ledger", settings, include=["nectar.ledger.tasks"], backend=settings.result_backend
    )
    every = timedelta(seconds=settings.epoch_seconds)
    app.conf.update(
        beat_schedule_filename=str(nectar_home() / "ledger-beat-schedule"),
        beat_schedule={
            "close-epoch": {"task": CLOSE_EPOCH_TASK, "schedule": every},
            "slash-conflicts": {"task": SLASH_CONFLICTS_TASK, "schedule": every},
            # withdrawal / reserve-release requests: their clients' vouchers settle before the unlock delay ends
            "watch-exits": {"task": WATCH_EXITS_TASK, "schedule": timedelta(seconds=settings.exit_poll_seconds)},
            "spot-checks": {"task": SPOT_CHECK_TASK, "schedule": every},
            "refresh-stakes": {
                "task": REFRESH_STAKES_TASK,
                "schedule": timedelta(seconds=settings.stake_refresh_seconds),
            },
            "finalize-slashes": {
                "task": FINALIZE_SLASHES_TASK,
                "schedule": timedelta(seconds=settings.slash_poll_seconds),
            },
        },
    )
    return app
