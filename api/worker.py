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
from nectar.service import celery_app

logger = logging.getLogger(__name__)

QUEUE = "nectar-api"
FINE_TUNE_TASK = "nectar.api.fine_tune"
TASK_MODULES = ["nectar.api.tasks"]
JOB_VISIBILITY_SECONDS = 6 * 3600  # a training job can run long: Redis must not redeliver it meanwhile


def producer_app(settings: Settings) -> Celery:
    """An app that can only send tasks (no task code imported)."""
    return celery_app.producer_app("nectar-api", settings, queue=QUEUE)


def create_celery(settings: Settings | None = None) -> Celery:
    return celery_app.worker_app(
        "nectar-api",
        settings or get_settings(),
        include=TASK_MODULES,
        queue=QUEUE,
        visibility_timeout=JOB_VISIBILITY_SECONDS,
    )


def __getattr__(name: str):
    # `celery -A nectar.api.worker` looks for `app`; building it lazily keeps imports of this module cheap
    if name in ("app", "celery"):
        return create_celery()
    raise AttributeError(name)
