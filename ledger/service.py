"""The ledger's FastAPI app: ``create_app(settings)`` migrates the database and mounts the routers."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from nectar.ledger.core.config import Settings, get_settings
from nectar.ledger.deps import LedgerState
from nectar.ledger.migrations import run_migrations
from nectar.ledger.routes import backing, epochs, health, nodes, stakes, submissions
from nectar.ledger.stakes import StakeBook
from nectar.service.body_limit import BodyLimit
from nectar.service.db import get_engine
from nectar.service.domain import DomainProvider

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    settings = settings or get_settings()
    if migrate:
        run_migrations(settings.database_url)
    app = FastAPI(title="Nectar ledger", version="1")
    app.state.ledger = LedgerState(
        settings=settings,
        engine=get_engine(settings.database_url),
        domains=DomainProvider(settings.deployment_path),
        stakes=StakeBook(settings.deployment_path, ttl=settings.stake_cache_seconds),
    )

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    for router in (health.router, submissions.router, nodes.router, epochs.router, stakes.router, backing.router):
        app.include_router(router)
    return app
