"""Accounts, API keys, funding and usage (``/v1/accounts``, ``/v1/account/...``), and the operator's grants."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query

from nectar.api.deps import AccountServiceDep, AdminDep, AuthDep, SignupDep
from nectar.api.routes.responses import errors
from nectar.api.schemas import (
    AccountCreate,
    AccountCreated,
    AccountPublic,
    AddressLink,
    AdminCredit,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    DepositList,
    DepositPublic,
    FaucetRequest,
    FundingInstructions,
    RowId,
    ScanResultPublic,
    UsageList,
)

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["accounts"])


@router.post(
    "/accounts", response_model=AccountCreated, status_code=201, summary="Create an account", responses=errors(401, 422)
)
async def create_account(body: AccountCreate, _: SignupDep, service: AccountServiceDep) -> AccountCreated:
    """A new account with its first API key (shown once). Open on a devnet; otherwise it needs the admin token."""
    return await service.create_account(body)


@router.get("/account", response_model=AccountPublic, summary="Show the caller's account", responses=errors(401, 429))
async def get_account(auth: AuthDep, service: AccountServiceDep) -> AccountPublic:
    """Balance, held credit, linked address, totals and the price per token."""
    return await service.get_account(auth)


@router.post(
    "/account/keys",
    response_model=ApiKeyCreated,
    status_code=201,
    summary="Create an API key",
    responses=errors(401, 422, 429),
)
async def create_key(body: ApiKeyCreate, auth: AuthDep, service: AccountServiceDep) -> ApiKeyCreated:
    """Another key for the account (shown once), with its own rate limit."""
    return await service.create_key(auth, body)


@router.get("/account/keys", response_model=list[ApiKeyPublic], summary="List API keys", responses=errors(401, 429))
async def list_keys(auth: AuthDep, service: AccountServiceDep) -> list[ApiKeyPublic]:
    """The account's keys (prefixes only)."""
    return await service.list_keys(auth)


@router.delete(
    "/account/keys/{key_id}", response_model=ApiKeyPublic, summary="Revoke an API key", responses=errors(401, 404, 429)
)
async def revoke_key(key_id: Annotated[RowId, Path()], auth: AuthDep, service: AccountServiceDep) -> ApiKeyPublic:
    """Revoke a key at once (requests with it get 401)."""
    return await service.revoke_key(auth, key_id)


@router.put(
    "/account/address",
    response_model=AccountPublic,
    summary="Link a funding address",
    responses=errors(401, 403, 409, 422, 429),
)
async def link_address(body: AddressLink, auth: AuthDep, service: AccountServiceDep) -> AccountPublic:
    """Link the Ethereum address whose escrow deposits fund this account, proven by its signature of
    ``Link <address> to Nectar API account acct-<id>``; earlier deposits from it are credited now."""
    return await service.link_address(auth, body)


@router.get(
    "/account/funding",
    response_model=FundingInstructions,
    summary="How to fund the account",
    responses=errors(401, 429),
)
async def funding(auth: AuthDep, service: AccountServiceDep) -> FundingInstructions:
    """The gateway's address, the contracts and the steps of an on-chain deposit."""
    return await service.funding(auth)


@router.post(
    "/account/deposits/scan",
    response_model=ScanResultPublic,
    summary="Credit new deposits now",
    responses=errors(401, 429, 503),
)
async def scan_deposits(auth: AuthDep, service: AccountServiceDep) -> ScanResultPublic:
    """Scan the chain for deposits to the gateway's escrow now (it also happens every few seconds)."""
    return await service.scan(auth)


@router.get("/account/deposits", response_model=DepositList, summary="List deposits", responses=errors(401, 429))
async def list_deposits(
    auth: AuthDep, service: AccountServiceDep, limit: int = Query(default=100, ge=1, le=1000)
) -> DepositList:
    """Credit added to the account, newest first."""
    return await service.deposits(auth, limit)


@router.post(
    "/account/faucet", response_model=DepositPublic, summary="Devnet faucet", responses=errors(401, 403, 422, 429, 503)
)
async def faucet(auth: AuthDep, service: AccountServiceDep, body: FaucetRequest | None = None) -> DepositPublic:
    """Devnet only: mint credits into the gateway's escrow on chain and credit them to the account."""
    return await service.faucet(auth, body or FaucetRequest())


@router.get("/account/usage", response_model=UsageList, summary="List metered requests", responses=errors(401, 429))
async def list_usage(
    auth: AuthDep, service: AccountServiceDep, limit: int = Query(default=100, ge=1, le=1000)
) -> UsageList:
    """What each request and job used and cost, newest first."""
    return await service.usage(auth, limit)


admin_router = APIRouter(prefix="/v1/admin", tags=["admin"])


@admin_router.post(
    "/accounts/{account_id}/credit",
    response_model=AccountPublic,
    summary="Grant credit",
    responses=errors(401, 404, 422),
)
async def grant_credit(
    account_id: Annotated[RowId, Path()], body: AdminCredit, _: AdminDep, service: AccountServiceDep
) -> AccountPublic:
    """Operator only (admin token): add credit to an account (promotions, refunds); recorded as a grant."""
    return await service.grant(account_id, body)
