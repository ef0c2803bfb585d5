"""Builds the ledger's Celery app from Settings. Producers (the HTTP service) enqueue by task name only."""
from __future__ import annotations

import logging
from datetime import timedelta

from celery import Celery

from nectar.ledger.core.config import Settings, get_settings
from nectar.paths import nectar_home

logger = logging.getLogger(__name__)

CLOSE_EPOCH_TASK = "nectar.ledger.close_epoch"
ADVANCE_EPOCHS_TASK = "nectar.ledger.advance_epochs"
SLASH_CONFLICTS_TASK = "nectar.ledger.slash_conflicts"
SPOT_CHECK_TASK = "nectar.ledger.spot_check_epochs"
REFRESH_STAKES_TASK = "nectar.ledger.refresh_stakes"
FINALIZE_SLASHES_TASK = "nectar.ledger.finalize_slashes"


def _configure_transport(settings: Settings) -> None:
    if settings.broker_url.startswith("sqla+"):
        # kombu reads polling_interval from the Transport class for this transport, not from broker options
        from kombu.transport.sqlalchemy import Transport

        Transport.polling_interval = settings.broker_polling_interval


def producer_app(settings: Settings) -> Celery:
    """An app that can only send tasks (no task code imported)."""
    _configure_transport(settings)
    app = Celery("nectar-ledger-producer", broker=settings.broker_url)
    app.conf.broker_connection_retry_on_startup = True
    app.conf.broker_connection_timeout = 5
    return app


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    _configure_transport(settings)
    app = Celery("nectar-ledger", broker=settings.broker_url, backend=settings.result_backend,
                 include=["nectar.ledger.tasks"])  # fmt: skip
    every = timedelta(seconds=settings.epoch_seconds)
    app.conf.update(
        task_acks_late=True,  # a task killed mid-run is redelivered, and each step checks the chain before acting
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=settings.result_backend is None,
        broker_connection_retry_on_startup=True,
        beat_schedule_filename=str(nectar_home() / "ledger-beat-schedule"),
        beat_schedule={
            "close-epoch": {"task": CLOSE_EPOCH_TASK, "schedule": every},
            "slash-conflicts": {"task": SLASH_CONFLICTS_TASK, "schedule": every},
            "spot-checks": {"task": SPOT_CHECK_TASK, "schedule": every},
            "refresh-stakes": {"task": REFRESH_STAKES_TASK, "schedule": timedelta(minutes=5)},
            "finalize-slashes": {"task": FINALIZE_SLASHES_TASK, "schedule": timedelta(seconds=settings.slash_poll_seconds)},
        },
    )
    app.conf.nectar_settings = settings
    return app
