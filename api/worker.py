"""The API's Celery app, built from the API Settings. Producers (the HTTP process) enqueue by task name only, so the
API never imports worker code; the worker loads ``nectar.api.tasks`` through ``include``.

Start it with ``nectar api worker`` (or ``celery -A nectar.api.worker worker -P threads -Q nectar-api``). API tasks go
to their own queue, ``nectar-api``, so the API and the ledger can share one broker without taking each other's tasks.
The pool is threads, not prefork: a job's swarm client starts a DHT process, which a daemonic prefork child may not.
"""
from __future__ import annotations

import logging

from celery import Celery

from nectar.api.core.config import Settings, get_settings

logger = logging.getLogger(__name__)

QUEUE = "nectar-api"
FINE_TUNE_TASK = "nectar.api.fine_tune"
TASK_MODULES = ["nectar.api.tasks"]


def _configure(app: Celery, settings: Settings) -> None:
    if settings.broker_url.startswith("sqla+"):
        # kombu reads polling_interval from the Transport class for this transport, not from broker options
        from kombu.transport.sqlalchemy import Transport

        Transport.polling_interval = settings.broker_polling_interval
    app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True, task_ignore_result=True)


def producer_app(settings: Settings) -> Celery:
    """An app that can only send tasks (no task code imported)."""
    app = Celery("nectar-api-producer", broker=settings.broker_url)
    _configure(app, settings)
    app.conf.broker_connection_timeout = 5
    return app


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("nectar-api", broker=settings.broker_url, include=TASK_MODULES)
    _configure(app, settings)
    app.conf.update(
        task_acks_late=True,  # a job whose worker dies is redelivered; the task restarts it from its saved state
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # a training job can run long: keep the Redis transport's redelivery timeout above it
        app.conf.broker_transport_options = {"visibility_timeout": 6 * 3600}
    app.conf.nectar_settings = settings
    return app


def __getattr__(name: str):
    # `celery -A nectar.api.worker` looks for `app`; building it lazily keeps imports of this module cheap
    if name in ("app", "celery"):
        return create_celery()
    raise AttributeError(name)
