"""The swarm monitor page (static HTML + JS, no build step) and the health check."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from nectar.api.deps import StateDep
from nectar.api.protocol import UNKNOWN_FIELDS
from nectar.api.schemas import Health

logger = logging.getLogger(__name__)
router = APIRouter(tags=["monitor"])

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@router.get(
    "/monitor",
    response_class=FileResponse,
    summary="Swarm monitor page",
    responses={200: {"description": "The monitor page.", "content": {"text/html": {}}}},
)
async def monitor() -> FileResponse:
    """An HTML page that polls the market endpoints: nodes and their blocks, state, throughput, price, reputation,
    and a chart of tokens served and credits settled."""
    return FileResponse(STATIC_DIR / "monitor.html", media_type="text/html")


@router.get("/health", response_model=Health, summary="Health check")
async def health(state: StateDep) -> Health:
    """Liveness, served models, database backend, chain and ledger configuration."""
    settings = state.settings
    return Health(
        status="ok",
        models=list(state.context.swarm.models),
        database=state.context.db.dialect.name,
        chain=settings.deployment_path.exists(),
        ledger=settings.ledger_url,
        unknown_fields=UNKNOWN_FIELDS.total,
    )
