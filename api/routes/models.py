"""``/v1/models``: the swarm models and the caller's fine-tuned models."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from nectar.api.deps import AuthDep, ModelsServingDep
from nectar.api.protocol import ModelCard, ModelDeleted, ModelList
from nectar.api.routes.responses import errors

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList, summary="List models", responses=errors(401, 429))
async def list_models(auth: AuthDep, serving: ModelsServingDep) -> ModelList:
    """Swarm models this gateway serves, and the caller's fine-tuned models."""
    return await serving.list_models(auth)


@router.get(
    "/models/{model:path}", response_model=ModelCard, summary="Retrieve a model", responses=errors(401, 404, 429)
)
async def get_model(model: str, auth: AuthDep, serving: ModelsServingDep) -> ModelCard:
    """One model by name."""
    return await serving.get_model(model, auth)


@router.delete(
    "/models/{model:path}",
    response_model=ModelDeleted,
    summary="Delete a fine-tuned model",
    responses=errors(401, 404, 429),
)
async def delete_model(model: str, auth: AuthDep, serving: ModelsServingDep) -> ModelDeleted:
    """Delete one of the caller's fine-tuned models (its trained prompts)."""
    return await serving.delete_model(model, auth)
