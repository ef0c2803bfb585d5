"""``POST /v1/completions`` and ``POST /v1/chat/completions``: hand off to the serving class, return JSON or SSE."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

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


CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the client that left


def _answer(result):
    if isinstance(result, PrimedStream):
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)
    return result


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is read already: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work):
    """Awaits ``work`` (the serving call), cancelling it as soon as the client disconnects: the generation stops at
    once, frees its slot and settles what was computed (``GenerationServing``). A stream is watched until its first
    event; from there Starlette's StreamingResponse cancels it on disconnect the same way."""
    task = asyncio.ensure_future(work)
    watch = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():  # the client left (or this handler was cancelled): stop the generation
            task.cancel()
            await asyncio.wait({task})  # its cleanup settles the hold before the handler returns
    if task.cancelled():
        logger.info(f"{request.method} {request.url.path}: the client went away; generation stopped")
        return Response(status_code=CLIENT_CLOSED)
    return _answer(task.result())


@router.post(
    "/completions",
    response_model=CompletionResponse,
    summary="Create a completion",
    responses={**sse_200("CompletionStreamResponse"), **errors(400, 401, 402, 404, 422, 429, 503)},
)
async def create_completion(request: Request, body: CompletionRequest, auth: AuthDep, serving: CompletionServingDep):
    """Continue a prompt through the swarm. The account is held the worst case (prompt + n x max_tokens tokens)
    before generation and charged exactly ``usage.total_tokens`` x the price per token after it. A client that
    disconnects stops the generation and is charged for what was computed until then."""
    return await cancel_on_disconnect(request, serving.create_completion(body, auth))


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    summary="Create a chat completion",
    responses={**sse_200("ChatCompletionStreamResponse"), **errors(400, 401, 402, 404, 422, 429, 503)},
)
async def create_chat_completion(request: Request, body: ChatCompletionRequest, auth: AuthDep, serving: ChatServingDep):
    """Answer a conversation formatted with the model's chat template; metered like completions."""
    return await cancel_on_disconnect(request, serving.create_chat_completion(body, auth))
