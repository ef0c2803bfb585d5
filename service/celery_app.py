"""Celery apps of the Nectar services. Producers (the HTTP processes) enqueue by task name only, so a service never
imports its worker code; workers load their task modules through ``include``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery

from nectar.service.settings import ServiceSettings

logger = logging.getLogger(__name__)


def _configure(app: Celery, settings: ServiceSettings, queue: str | None, backend: str | None) -> None:
    if settings.broker_url.startswith("sqla+"):
        # kombu reads polling_interval from the Transport class for this transport, not from broker options
        from kombu.transport.sqlalchemy import Transport

        Transport.polling_interval = settings.broker_polling_interval
    app.conf.update(broker_connection_retry_on_startup=True, task_ignore_result=backend is None)
    if queue:  # its own queue lets two services share one broker without taking each other's tasks
        app.conf.task_default_queue = queue


def producer_app(name: str, settings: ServiceSettings, *, queue: str | None = None) -> Celery:
    """An app that can only send tasks (no task code imported)."""
    app = Celery(f"{name}-producer", broker=settings.broker_url)
    _configure(app, settings, queue, None)
    app.conf.broker_connection_timeout = 5
    return app


def worker_app(
    name: str,
    settings: ServiceSettings,
    *,
    include: Sequence[str],
    queue: str | None = None,
    backend: str | None = None,
    visibility_timeout: float | None = None,
) -> Celery:
    """The worker's app; its settings are on ``app.conf.nectar_settings`` for the tasks.

    :param visibility_timeout: seconds before the Redis transport redelivers an unacknowledged task; set it above
        the longest task"""
    app = Celery(name, broker=settings.broker_url, backend=backend, include=list(include))
    _configure(app, settings, queue, backend)
    app.conf.update(
        task_acks_late=True,  # a task whose worker dies is redelivered; each task resumes from its saved state
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
    )
    if visibility_timeout is not None and settings.broker_url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout}
    app.conf.nectar_settings = settings
    return app
