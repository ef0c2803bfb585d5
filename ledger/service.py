"""The ledger's FastAPI app: ``create_app(settings)`` migrates the database and mounts the routers."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI

from nectar.ledger.core.config import Settings, get_settings
from nectar.ledger.deps import LedgerState
from nectar.ledger.migrations import run_migrations
from nectar.ledger.routes import backing, epochs, health, nodes, stakes, submissions
from nectar.ledger.stakes import StakeBook
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

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for router in (health.router, submissions.router, nodes.router, epochs.router, stakes.router, backing.router):
        app.include_router(router)
    return app


class BodyLimit:
    """Refuses (413) a request body over ``max_bytes`` by the bytes actually received, not by ``Content-Length``
    alone: a chunked body declares no length (issue 22: a chunked 40 MiB body was accepted). The body is read here up
    to the limit, then handed on, so no more than ``max_bytes`` of one request is ever held."""

    def __init__(self, app, *, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # the app waits for a disconnect after the body
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        detail = json.dumps({"detail": f"body over {self.max_bytes} bytes; send smaller batches"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(detail)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": detail})
