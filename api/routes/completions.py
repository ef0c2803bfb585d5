"""``POST /v1/completions`` and ``POST /v1/chat/completions``: hand off to the serving class, return JSON or SSE."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from nectar.api.deps import AuthDep, ChatServingDep, CompletionServingDep
from nectar.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from nectar.api.routes.responses import errors, sse_200
from nectar.api.serving.generation import PrimedStream

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["inference"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _answer(result):
    if isinstance(result, PrimedStream):
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)
    return result


@router.post(
    "/completions",
    response_model=CompletionResponse,
    summary="Create a completion",
    responses={**sse_200("CompletionStreamResponse"), **errors(400, 401, 402, 404, 422, 429, 503)},
)
async def create_completion(body: CompletionRequest, auth: AuthDep, serving: CompletionServingDep):
    """Continue a prompt through the swarm. The account is held the worst case (prompt + n x max_tokens tokens)
    before generation and charged exactly ``usage.total_tokens`` x the price per token after it."""
    return _answer(await serving.create_completion(body, auth))


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    summary="Create a chat completion",
    responses={**sse_200("ChatCompletionStreamResponse"), **errors(400, 401, 402, 404, 422, 429, 503)},
)
async def create_chat_completion(body: ChatCompletionRequest, auth: AuthDep, serving: ChatServingDep):
    """Answer a conversation formatted with the model's chat template; metered like completions."""
    return _answer(await serving.create_chat_completion(body, auth))
