"""Builds the API gateway's FastAPI app: ``create_app(settings)``.

Startup migrates the database, joins the swarm (one client per served model), and starts two background loops: the
chain scan that credits deposits and records settlements, and the sweep that returns holds left by crashed requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from nectar.api import crud
from nectar.api.billing import Billing
from nectar.api.chain_watch import ChainUnavailable, ChainWatcher
from nectar.api.core.config import Settings, get_settings
from nectar.api.deps import ApiState
from nectar.api.engine import Engine
from nectar.api.errors import ApiError, install_error_handlers
from nectar.api.migrations import run_migrations
from nectar.api.protocol import ChatCompletionStreamResponse, CompletionStreamResponse
from nectar.api.ratelimit import make_rate_limiter
from nectar.api.routes import api_router
from nectar.api.routes.monitor import STATIC_DIR
from nectar.api.serving.accounts import AccountService
from nectar.api.serving.base import ServingContext
from nectar.api.serving.chat import OpenAIServingChat
from nectar.api.serving.completions import OpenAIServingCompletion
from nectar.api.serving.fine_tuning import OpenAIServingFiles, OpenAIServingFineTuning
from nectar.api.serving.market import MarketService
from nectar.api.serving.models import OpenAIServingModels
from nectar.cli_kit import swarm_file
from nectar.service.body_limit import BodyLimit
from nectar.service.db import get_engine, session_scope
from nectar.wire.peers import initial_peers

logger = logging.getLogger(__name__)

HOLD_SWEEP_SECONDS = 60.0
STREAM_MODELS = (CompletionStreamResponse, ChatCompletionStreamResponse)
DESCRIPTION = """An OpenAI-compatible API over the Nectar swarm, paid for with credits.

Create an account (`POST /v1/accounts`), fund it (an escrow deposit from your linked address, or the devnet faucet),
then use any OpenAI client with `base_url=<this server>/v1` and your key. The swarm monitor is at `/monitor`."""


def build_state(settings: Settings, swarm: Engine) -> ApiState:
    db = get_engine(settings.database_url)
    billing = Billing(db, price_per_token=settings.price_per_token, hold_timeout=settings.hold_timeout_seconds)
    context = ServingContext(settings=settings, db=db, swarm=swarm, billing=billing)
    watcher = ChainWatcher(settings, db, gateway_key=settings.gateway_key())
    with session_scope(db) as session:  # made once per database: every process of the deployment reads the same
        gateway_id = crud.gateway_id(session)
    ledger = None
    if settings.ledger_url:
        from nectar.wire.ledger_api import LedgerClient

        ledger = LedgerClient(settings.ledger_url, timeout=10.0)
    return ApiState(
        settings=settings,
        context=context,
        limiter=make_rate_limiter(settings.rate_limit_url),
        watcher=watcher,
        completions=OpenAIServingCompletion(context),
        chat=OpenAIServingChat(context),
        models=OpenAIServingModels(context),
        files=OpenAIServingFiles(context),
        fine_tuning=OpenAIServingFineTuning(context),
        accounts=AccountService(context, watcher),
        market=MarketService(context, ledger=ledger, watcher=watcher),
        gateway_id=gateway_id,
    )


async def _every(seconds: float, work, what: str) -> None:
    quiet = False
    while True:
        try:
            await work()
            quiet = False
        except ChainUnavailable as e:  # expected without a devnet: say it once
            if not quiet:
                logger.info(f"{what}: {e}")
                quiet = True
        except Exception:
            logger.exception(f"{what} failed; retrying in {seconds:.0f}s")
        await asyncio.sleep(seconds)


def create_app(settings: Settings | None = None, *, swarm: Engine | None = None) -> FastAPI:
    """:param settings: default: from the environment (``NECTAR_API_*``)
    :param swarm: an already started Engine (tests); default: started from settings at startup"""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(run_migrations, settings.database_url)
        engine = swarm
        if engine is None:
            peers = initial_peers(settings.initial_peers, env=os.environ, swarm=swarm_file(env=os.environ))
            domain = settings.signing_domain()  # the vouchers' domain: the API's deployment
            engine = await anyio.to_thread.run_sync(
                lambda: Engine.start(
                    settings.models,
                    initial_peers=peers,
                    private_key=settings.gateway_key(),
                    step_timeout=settings.step_timeout,
                    max_concurrent=settings.max_concurrent_generations,
                    max_queued=settings.max_queued_generations,
                    tuned_cache_size=settings.tuned_cache_size,
                    head_device=settings.head_device,
                    ledger_url=settings.ledger_url,
                    domain=domain,
                )
            )
        state = build_state(settings, engine)
        app.state.api = state
        tasks = [
            asyncio.create_task(
                _every(
                    settings.deposit_poll_seconds, lambda: anyio.to_thread.run_sync(state.watcher.scan), "Chain scan"
                )
            ),
            asyncio.create_task(_every(HOLD_SWEEP_SECONDS, state.context.billing.release_stale, "Hold sweep")),
        ]
        logger.info(
            f"Nectar API ready on {settings.base_url} serving {', '.join(engine.models)}; gateway wallet "
            f"{engine.wallet_address}; priced at the route's price + {settings.price_margin:.0%} (at least "
            f"{settings.price_per_token} micro-credits per token; up to {settings.max_route_price} wei per token)"
        )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if swarm is None:
                await anyio.to_thread.run_sync(engine.shutdown)

    # /docs and /redoc with their assets served here (FastAPI's default loads them from a CDN: blank offline)
    app = FastAPIOffline(
        title="Nectar API", version="1", description=DESCRIPTION, lifespan=lifespan, static_url="/static/docs"
    )
    install_error_handlers(app)

    def body_limit(scope) -> int:
        return settings.max_file_bytes + 64 * 1024 if scope["path"] == "/v1/files" else settings.max_request_bytes

    def too_large(limit: int, declared: int | None):
        size = f"The body has {declared} bytes" if declared is not None else "The body is larger than that"
        return ApiError(413, f"{size}; at most {limit} are accepted here", code="body_too_large").response()

    # counts the bytes read, not Content-Length alone: a chunked body declares none (issue 22)
    app.add_middleware(BodyLimit, limit=body_limit, refusal=too_large)
    app.add_middleware(RefuseNulInUrl)

    app.include_router(api_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.openapi = lambda: _openapi(app)
    return app


class RefuseNulInUrl:
    """400 for a NUL character in the path or query: PostgreSQL cannot compare one, so an id holding it gave 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")):
            message = "The URL holds a NUL character (%00); ids and names never do"
            return await ApiError(400, message, code="invalid_url").response()(scope, receive, send)
        return await self.app(scope, receive, send)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with its generic validation-error model replaced by ours (every error is ErrorResponse)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    ours = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            answer = responses.get("422")
            if answer and "HTTPValidationError" in str(answer):  # answered 400, as OpenAI and vLLM do
                del responses["422"]
                responses.setdefault(
                    "400",
                    {
                        "description": "Malformed request: the message and ``param`` name the field.",
                        "content": {"application/json": {"schema": ours}},
                    },
                )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for model in STREAM_MODELS:  # referenced by the text/event-stream answers
        found = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for name, definition in found.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[model.__name__] = found
    for name, definition in components.items():
        if name.startswith("Body_") and "description" not in definition:  # FastAPI's multipart form models
            definition["description"] = "Multipart form: the file and its purpose."
    app.openapi_schema = schema
    return schema
