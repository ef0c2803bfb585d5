"""FastAPI dependencies: the services built once at startup (kept on app state), auth, rate limits, admin."""

from __future__ import annotations

import hmac
import ipaddress
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
from nectar.wire import request_auth

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
    gateway_id: str  # this deployment's id (api_gateway_values): operators' signed requests name it


def get_state(request: Request) -> ApiState:
    return request.app.state.api


StateDep = Annotated[ApiState, Depends(get_state)]


def client_address(request: Request, trusted_proxies: list[str]) -> str:
    """The caller's address: the peer's, or, when the peer is a configured proxy, the last address of
    X-Forwarded-For that is not one of the proxies (a client can write any X-Forwarded-For it likes)."""
    peer = request.client.host if request.client else "unknown"
    if not trusted_proxies:
        return peer
    networks = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in networks)

    if not trusted(peer):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getlist("x-forwarded-for")).split(",") if h.strip()]
    for hop in reversed(hops[-32:]):  # bounded: the header is the caller's
        if not trusted(hop):
            return hop[:64]
    return peer


def _is_admin(state: ApiState, credentials: HTTPAuthorizationCredentials | None) -> bool:
    # constant time: a plain == leaks how many leading characters matched
    given = credentials.credentials if credentials is not None else ""
    return hmac.compare_digest(given.encode(), state.settings.admin_token.encode())


def _too_many(retry_after: float, message: str, code: str) -> ApiError:
    return ApiError(429, message, code=code, headers={"Retry-After": str(max(1, int(retry_after + 0.999)))})


async def _check_failures(request: Request, state: ApiState) -> str:
    """429 while the caller's address is over its failed authentications (guessing keys or signatures costs the
    guesser time, not us); else the counter's name, for the caller to count a failure on."""
    settings = state.settings
    failures = f"authfail:{client_address(request, settings.trusted_proxies)}"
    blocked = await anyio.to_thread.run_sync(state.limiter.blocked, failures, settings.auth_failures_per_minute)
    if blocked is not None:
        raise _too_many(
            blocked,
            f"Too many failed authentications from your address; retry in {blocked:.0f}s with a valid key",
            "too_many_auth_failures",
        )
    return failures


async def get_auth(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Auth:
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>' (create an account with POST /v1/accounts to get one)",
            code="missing_api_key",
        )
    secret = credentials.credentials
    settings, limiter = state.settings, state.limiter
    failures = await _check_failures(request, state)

    def lookup():  # keys are looked up by their SHA-256: no secret is compared character by character
        with session_scope(state.context.db) as session:
            key = crud.key_by_plaintext(session, key=secret)
            return None if key is None else (key.account_id, key.id, key.rate_limit_per_minute)

    found = await anyio.to_thread.run_sync(lookup)
    if found is None:
        await anyio.to_thread.run_sync(limiter.hit, failures, settings.auth_failures_per_minute)
        shown = secret[:6] + "..." if len(secret) > 6 else "***"
        raise ApiError(
            401,
            f"Incorrect API key provided ({shown}); it is unknown or revoked. Check the key, or "
            f"create one with POST /v1/account/keys",
            code="invalid_api_key",
        )
    account_id, key_id, limit = found
    # the operator's limit caps every key, also keys made before it was lowered
    limit = min(limit or settings.rate_limit_per_minute, settings.rate_limit_per_minute)
    retry_after = await anyio.to_thread.run_sync(limiter.hit, f"key:{key_id}", limit)
    if retry_after is not None:
        raise _too_many(
            retry_after,
            f"Rate limit of {limit} requests per minute reached for this key; retry in "
            f"{retry_after:.0f}s or ask the operator for a higher limit",
            "rate_limit_exceeded",
        )
    return Auth(account_id=account_id, key_id=key_id)


AuthDep = Annotated[Auth, Depends(get_auth)]


async def require_admin(
    request: Request, state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    failures = await _check_failures(request, state)
    if not _is_admin(state, credentials):
        await anyio.to_thread.run_sync(state.limiter.hit, failures, state.settings.auth_failures_per_minute)
        raise ApiError(401, "Admin endpoint: send 'Authorization: Bearer <NECTAR_API_ADMIN_TOKEN>'", code="admin_only")


AdminDep = Annotated[None, Depends(require_admin)]

SIGNUP_WINDOW = 3600


async def signup_allowed(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    settings = state.settings
    if credentials is not None and _is_admin(state, credentials):
        return
    if not settings.signup_open:
        raise ApiError(
            401,
            "Sign-up is closed on this gateway: ask its operator for an account (the admin token creates accounts)",
            code="signup_closed",
        )
    name = f"signup:{client_address(request, settings.trusted_proxies)}"
    retry_after = await anyio.to_thread.run_sync(state.limiter.hit, name, settings.signups_per_hour, SIGNUP_WINDOW)
    if retry_after is not None:
        raise _too_many(
            retry_after,
            f"At most {settings.signups_per_hour} accounts per hour are created for one address; retry in "
            f"{retry_after:.0f}s, or add API keys to your account (POST /v1/account/keys)",
            "too_many_signups",
        )


SignupDep = Annotated[None, Depends(signup_allowed)]


async def _signed_caller(request: Request, state: ApiState, failures: str) -> str | None:
    """The node address that signed this request (``nectar.wire.request_auth``), None if unsigned; 401 if the
    signature is bad or replayed."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.headers.get(request_auth.HEADER_SIGNATURE) is None:
        return None
    try:
        caller = request_auth.check(request.method, path, request.headers, gateway=state.gateway_id)
        fresh = await anyio.to_thread.run_sync(
            state.limiter.first_use, f"nonce:{caller.nonce}", 4 * request_auth.MAX_SKEW
        )
        if not fresh:
            raise request_auth.BadSignature("this signed request was already used (a replay): sign each one anew")
    except request_auth.BadSignature as e:  # counts as a failed authentication
        await anyio.to_thread.run_sync(state.limiter.hit, failures, state.settings.auth_failures_per_minute)
        code = "replayed" if "already used" in str(e) else "bad_signature"
        raise ApiError(401, f"Bad signed request: {e}. `nectar operator records` signs them", code=code) from None
    return caller.address


OPERATOR_ONLY = (
    "Operator endpoint: send the admin token ('Authorization: Bearer <NECTAR_API_ADMIN_TOKEN>') or a request signed "
    "by the node's own Ethereum key (`nectar operator records --name NAME`, or nectar.wire.request_auth.sign_request)"
)


async def _admin_or_signer(request: Request, state: ApiState, credentials) -> str | None:
    """None for the admin, else the signing node's address; 401 (a counted failure) for a wrong token or
    signature, 429 while the caller's address is over its failures."""
    failures = await _check_failures(request, state)
    if credentials is not None:
        if _is_admin(state, credentials):
            return None
        await anyio.to_thread.run_sync(state.limiter.hit, failures, state.settings.auth_failures_per_minute)
        raise ApiError(401, f"Wrong admin token. {OPERATOR_ONLY}", code="operator_only")
    signer = await _signed_caller(request, state, failures)
    if signer is None:
        raise ApiError(401, OPERATOR_ONLY, code="operator_only")
    return signer


async def require_node_or_admin(
    request: Request,
    address: str,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """A node's records: the admin, or that node itself (signed)."""
    signer = await _admin_or_signer(request, state, credentials)
    if signer is None:
        return
    if signer.lower() != address.lower():
        raise ApiError(403, f"{signer} may read only its own records, not {address}'s", code="not_your_records")


async def require_member_or_admin(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Market-wide figures: the admin, or a node of the served swarm (signed)."""
    signer = await _admin_or_signer(request, state, credentials)
    if signer is None:
        return
    view = await state.market.swarm_view()
    if signer.lower() not in {(n.eth_address or "").lower() for n in view.nodes}:
        raise ApiError(403, f"{signer} is not a node of this gateway's swarm", code="not_a_member")


NodeOrAdminDep = Annotated[None, Depends(require_node_or_admin)]
MemberOrAdminDep = Annotated[None, Depends(require_member_or_admin)]


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
