"""FastAPI dependencies: the services built once at startup (kept on app state), auth, rate limits, admin."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from nectar.api import crud
from nectar.api.chain_watch import ChainWatcher
from nectar.api.core.config import Settings
from nectar.api.errors import ApiError
from nectar.api.ratelimit import RateLimiter
from nectar.api.serving.accounts import AccountService
from nectar.api.serving.base import Auth, ServingContext
from nectar.api.serving.chat import OpenAIServingChat
from nectar.api.serving.completions import OpenAIServingCompletion
from nectar.api.serving.fine_tuning import OpenAIServingFiles, OpenAIServingFineTuning
from nectar.api.serving.market import MarketService
from nectar.api.serving.models import OpenAIServingModels
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)

bearer = HTTPBearer(
    auto_error=False, description="An API key (``nk-...``) from POST /v1/accounts or POST /v1/account/keys"
)


@dataclass
class ApiState:
    """Everything built at startup; routes reach it through the accessors below."""

    settings: Settings
    context: ServingContext
    limiter: RateLimiter
    watcher: ChainWatcher
    completions: OpenAIServingCompletion
    chat: OpenAIServingChat
    models: OpenAIServingModels
    files: OpenAIServingFiles
    fine_tuning: OpenAIServingFineTuning
    accounts: AccountService
    market: MarketService


def get_state(request: Request) -> ApiState:
    return request.app.state.api


StateDep = Annotated[ApiState, Depends(get_state)]


async def get_auth(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Auth:
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>' (create an account with POST /v1/accounts to get one)",
            code="missing_api_key",
        )
    secret = credentials.credentials

    def lookup():
        with session_scope(state.context.db) as session:
            key = crud.key_by_plaintext(session, key=secret)
            return None if key is None else (key.account_id, key.id, key.rate_limit_per_minute)

    found = await anyio.to_thread.run_sync(lookup)
    if found is None:
        shown = secret[:6] + "..." if len(secret) > 6 else "***"
        raise ApiError(
            401,
            f"Incorrect API key provided ({shown}); it is unknown or revoked. Check the key, or "
            f"create one with POST /v1/account/keys",
            code="invalid_api_key",
        )
    account_id, key_id, limit = found
    limit = limit or state.settings.rate_limit_per_minute
    retry_after = await anyio.to_thread.run_sync(state.limiter.hit, key_id, limit)
    if retry_after is not None:
        raise ApiError(
            429,
            f"Rate limit of {limit} requests per minute reached for this key; retry in "
            f"{retry_after:.0f}s or ask for a higher limit",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
        )
    return Auth(account_id=account_id, key_id=key_id)


AuthDep = Annotated[Auth, Depends(get_auth)]


async def require_admin(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if credentials is None or credentials.credentials != state.settings.admin_token:
        raise ApiError(401, "Admin endpoint: send 'Authorization: Bearer <NECTAR_API_ADMIN_TOKEN>'", code="admin_only")


AdminDep = Annotated[None, Depends(require_admin)]


async def signup_allowed(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if state.settings.allow_signup:
        return
    if credentials is None or credentials.credentials != state.settings.admin_token:
        raise ApiError(
            401,
            "Sign-up is closed on this gateway: ask its operator for an account (the admin token creates accounts)",
            code="signup_closed",
        )


SignupDep = Annotated[None, Depends(signup_allowed)]


# tiny accessors of the serving classes (vLLM style)
def completion_serving(state: StateDep) -> OpenAIServingCompletion:
    return state.completions


def chat_serving(state: StateDep) -> OpenAIServingChat:
    return state.chat


def models_serving(state: StateDep) -> OpenAIServingModels:
    return state.models


def files_serving(state: StateDep) -> OpenAIServingFiles:
    return state.files


def fine_tuning_serving(state: StateDep) -> OpenAIServingFineTuning:
    return state.fine_tuning


def account_service(state: StateDep) -> AccountService:
    return state.accounts


def market_service(state: StateDep) -> MarketService:
    return state.market


CompletionServingDep = Annotated[OpenAIServingCompletion, Depends(completion_serving)]
ChatServingDep = Annotated[OpenAIServingChat, Depends(chat_serving)]
ModelsServingDep = Annotated[OpenAIServingModels, Depends(models_serving)]
FilesServingDep = Annotated[OpenAIServingFiles, Depends(files_serving)]
FineTuningServingDep = Annotated[OpenAIServingFineTuning, Depends(fine_tuning_serving)]
AccountServiceDep = Annotated[AccountService, Depends(account_service)]
MarketServiceDep = Annotated[MarketService, Depends(market_service)]
