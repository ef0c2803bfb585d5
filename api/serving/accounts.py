"""``AccountService``: accounts, API keys, funding (linked address, chain scan, devnet faucet), usage."""

from __future__ import annotations

import logging

import anyio
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct
from eth_utils import to_checksum_address

from nectar.api import crud
from nectar.api.chain_watch import ChainUnavailable, ChainWatcher
from nectar.api.core.config import credits_to_micro, micro_to_credits
from nectar.api.errors import ApiError, bad_request, not_found, unavailable
from nectar.api.models import Account, ApiKey, Deposit, Usage
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
    ScanResultPublic,
    UsageList,
    UsagePublic,
    link_message,
)
from nectar.api.serving.base import Auth, ServingContext
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)


class AccountService:
    """Thin over ``crud``: each method is one transaction in a worker thread."""

    def __init__(self, context: ServingContext, watcher: ChainWatcher):
        self.context, self.settings, self.watcher = context, context.settings, watcher

    def _tx(self, work):
        def run():
            with session_scope(self.context.db) as session:
                return work(session)

        return anyio.to_thread.run_sync(run)

    # ---- views -------------------------------------------------------------------------------------------------

    def _account_public(self, session, account: Account) -> AccountPublic:
        requests, tokens, spent = crud.usage_totals(session, account_id=account.id)
        return AccountPublic(
            id=f"acct-{account.id}",
            name=account.name,
            eth_address=account.eth_address,
            balance_credits=micro_to_credits(account.balance),
            balance_micro=account.balance,
            held_micro=account.held,
            price_per_token_micro=self.settings.price_per_token,
            requests=requests,
            tokens=tokens,
            spent_micro=spent,
            created_at=account.created_at,
        )

    def key_public(self, key: ApiKey) -> ApiKeyPublic:
        return ApiKeyPublic(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            created_at=key.created_at,
            rate_limit_per_minute=min(key.rate_limit_per_minute or 10**9, self.settings.rate_limit_per_minute),
            revoked=key.revoked_at is not None,
        )

    @staticmethod
    def _deposit_public(d: Deposit) -> DepositPublic:
        return DepositPublic(
            id=d.id,
            source=d.source,
            amount_credits=micro_to_credits(d.amount),
            amount_micro=d.amount,
            depositor=d.depositor,
            tx_hash=d.tx_hash,
            block_number=d.block_number,
            created_at=d.created_at,
        )

    # ---- accounts and keys -------------------------------------------------------------------------------------

    async def create_account(self, body: AccountCreate) -> AccountCreated:
        def work(session):
            account = crud.create_account(session, name=body.name)
            key, secret = crud.create_api_key(session, account_id=account.id, name="default")
            return AccountCreated(
                account=self._account_public(session, account), api_key=secret, key=self.key_public(key)
            )

        created = await self._tx(work)
        logger.info(f"Created account {created.account.id} ({body.name!r})")
        return created

    async def get_account(self, auth: Auth) -> AccountPublic:
        return await self._tx(lambda s: self._account_public(s, crud.get_account(s, account_id=auth.account_id)))

    async def create_key(self, auth: Auth, body: ApiKeyCreate) -> ApiKeyCreated:
        cap = self.settings.rate_limit_per_minute
        if body.rate_limit_per_minute is not None and body.rate_limit_per_minute > cap:  # lower, never raise
            raise bad_request(
                f"rate_limit_per_minute can be at most {cap} (the gateway's limit per key); ask the operator for more",
                param="rate_limit_per_minute",
                code="rate_limit_above_policy",
            )

        def work(session):
            keys = crud.count_live_keys(session, account_id=auth.account_id, lock=True)
            if keys >= self.settings.max_keys_per_account:
                raise bad_request(
                    f"This account already has {keys} API keys, the most allowed; revoke one first "
                    "(DELETE /v1/account/keys/{key_id})",
                    code="too_many_keys",
                )
            key, secret = crud.create_api_key(
                session, account_id=auth.account_id, name=body.name, rate_limit_per_minute=body.rate_limit_per_minute
            )
            return ApiKeyCreated(key=self.key_public(key), api_key=secret)

        return await self._tx(work)

    async def list_keys(self, auth: Auth) -> list[ApiKeyPublic]:
        return await self._tx(lambda s: [self.key_public(k) for k in crud.list_api_keys(s, account_id=auth.account_id)])

    async def revoke_key(self, auth: Auth, key_id: int) -> ApiKeyPublic:
        key = await self._tx(lambda s: crud.revoke_api_key(s, account_id=auth.account_id, key_id=key_id))
        if key is None:
            raise not_found(f"No key {key_id} on this account (GET /v1/account/keys lists them)", param="key_id")
        return self.key_public(key)

    # ---- funding -----------------------------------------------------------------------------------------------

    async def link_address(self, auth: Auth, body: AddressLink) -> AccountPublic:
        address = to_checksum_address(body.eth_address)
        message = link_message(auth.account_id, address)
        try:
            signer = EthAccount.recover_message(encode_defunct(text=message), signature=body.signature)
        except Exception as e:
            raise ApiError(400, f"malformed signature ({e})", param="signature", code="bad_signature") from None
        if signer != address:
            raise ApiError(
                403,
                f"The signature is by {signer}, not {address}. Sign exactly {message!r} with the "
                f"key of {address} (personal_sign / EIP-191).",
                param="signature",
                code="bad_signature",
            )

        def work(session):
            owner = crud.account_by_address(session, address=address)
            if owner is not None and owner.id != auth.account_id:
                raise ApiError(
                    409, f"{address} is already linked to another account", param="eth_address", code="address_taken"
                )
            account = crud.set_eth_address(session, account_id=auth.account_id, address=address)
            claimed = crud.claim_unassigned_deposits(session, account_id=auth.account_id, address=address)
            if claimed:
                logger.info(f"acct-{auth.account_id} claimed {claimed} micro-credits deposited earlier from {address}")
            session.flush()
            session.refresh(account)
            return self._account_public(session, account)

        return await self._tx(work)

    async def funding(self, auth: Auth) -> FundingInstructions:
        account = await self.get_account(auth)
        try:
            info = await anyio.to_thread.run_sync(self.watcher.deposit_instructions)
        except Exception as e:
            logger.info(f"No chain for funding instructions: {e}")
            info = {
                "chain_id": None,
                "rpc_url": None,
                "escrow": None,
                "credits_token": None,
                "gateway_address": self.watcher.gateway,
            }
        steps = [
            f"1. Link your address: sign {link_message(auth.account_id, '<your address>')!r} and PUT "
            f"/v1/account/address {{eth_address, signature}}"
            if account.eth_address is None
            else f"1. Deposits must come from your linked address {account.eth_address}",
            f"2. Credits.approve({info['escrow']}, amount) from that address",
            f"3. Escrow.depositFor({info['gateway_address']}, amount) from that address",
            "4. POST /v1/account/deposits/scan (or wait a few seconds): the deposit is credited once",
        ]
        return FundingInstructions(
            linked_address=account.eth_address,
            steps=steps,
            faucet_available=self.settings.environment == "devnet",
            **info,
        )

    async def scan(self, auth: Auth) -> ScanResultPublic:
        try:
            result = await anyio.to_thread.run_sync(self.watcher.scan)
        except ChainUnavailable as e:
            raise unavailable(str(e), code="chain_unavailable") from None
        account = await self.get_account(auth)
        return ScanResultPublic(
            credited=result.credited,
            unassigned=result.unassigned,
            settled_batches=result.settled_batches,
            to_block=result.to_block,
            account=account,
        )

    async def faucet(self, auth: Auth, body: FaucetRequest) -> DepositPublic:
        if self.settings.environment != "devnet":
            raise ApiError(
                403,
                "The faucet exists on a devnet only; fund the account with an escrow deposit (GET /v1/account/funding)",
                code="faucet_disabled",
            )
        credits = min(body.credits or self.settings.faucet_credits, self.settings.faucet_credits)
        try:
            deposit = await anyio.to_thread.run_sync(
                lambda: self.watcher.faucet(account_id=auth.account_id, credits=credits)
            )
        except ChainUnavailable as e:
            raise unavailable(str(e), code="chain_unavailable") from None
        except Exception as e:
            logger.warning(f"Faucet failed: {type(e).__name__}: {e}")
            raise unavailable(
                f"The devnet faucet failed ({type(e).__name__}: {e}); is `nectar devnet` running?",
                code="chain_unavailable",
            ) from None
        return self._deposit_public(deposit)

    async def deposits(self, auth: Auth, limit: int) -> DepositList:
        rows = await self._tx(lambda s: crud.list_deposits(s, account_id=auth.account_id, limit=limit))
        return DepositList(data=[self._deposit_public(d) for d in rows])

    async def usage(self, auth: Auth, limit: int) -> UsageList:
        def public(u: Usage) -> UsagePublic:
            return UsagePublic(
                reference=u.reference,
                kind=u.kind,
                model=u.model,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cost_micro=u.cost,
                created_at=u.created_at,
            )

        rows = await self._tx(lambda s: crud.list_usage(s, account_id=auth.account_id, limit=limit))
        return UsageList(data=[public(u) for u in rows])

    async def grant(self, account_id: int, body: AdminCredit) -> AccountPublic:
        def work(session):
            account = crud.get_account(session, account_id=account_id)
            if account is None:
                raise not_found(f"No account acct-{account_id}", param="account_id")
            crud.add_credit(
                session, account_id=account_id, amount=credits_to_micro(body.credits), source="grant", note=body.note
            )
            session.flush()
            session.refresh(account)
            return self._account_public(session, account)

        return await self._tx(work)
