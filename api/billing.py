"""``Billing``: the credit book as the request path sees it. Each metered request places a hold for its worst case
before any work starts (402 if the balance cannot cover it), then settles the hold with the real cost.

Database calls run in worker threads so a busy SQLite write lock never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

import anyio
from sqlalchemy import Engine

from nectar.api import crud
from nectar.api.core.config import micro_to_credits
from nectar.api.errors import ApiError
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)


@dataclass
class Charge:
    """What a finished request used."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Billing:
    """Prices tokens and moves credit. ``price_per_token`` is in micro-credits."""

    def __init__(self, engine: Engine, *, price_per_token: int, hold_timeout: float):
        self.engine, self.price_per_token, self.hold_timeout = engine, price_per_token, hold_timeout

    def cost(self, tokens: int) -> int:
        return tokens * self.price_per_token

    def _run(self, function, *args):
        return anyio.to_thread.run_sync(function, *args)

    async def reserve(self, *, account_id: int, tokens: int, reference: str, what: str) -> int:
        """Holds the price of ``tokens``; returns the hold id, or raises a 402 saying how to get credit."""
        detail = f"{tokens} tokens at {micro_to_credits(self.price_per_token)} per token"
        return await self.reserve_amount(
            account_id=account_id, amount=self.cost(tokens), reference=reference, what=what, detail=detail
        )

    async def reserve_amount(self, *, account_id: int, amount: int, reference: str, what: str, detail: str) -> int:
        """Holds ``amount`` micro-credits (``detail`` says what it pays for, in the 402)."""

        def work():
            with session_scope(self.engine) as session:
                hold = crud.place_hold(session, account_id=account_id, amount=amount, reference=reference)
                if hold is not None:
                    return hold.id, None
                account = crud.get_account(session, account_id=account_id)
                return None, account.balance if account is not None else 0

        hold_id, balance = await self._run(work)
        if hold_id is None:
            raise ApiError(
                402,
                f"Insufficient credits: account acct-{account_id} has {micro_to_credits(balance)} "
                f"credits available and {what} may cost up to {micro_to_credits(amount)} credits "
                f"({detail}). Add "
                f"credit (Escrow.depositFor(<gateway address>, amount) from your linked address; on a "
                f"devnet POST /v1/account/faucet) or ask for fewer tokens (max_tokens).",
                code="insufficient_credits",
            )
        return hold_id

    async def settle(
        self, *, hold_id: int, charge: Charge, kind: str, model: str, key_id: int | None, cost: int | None = None
    ) -> int:
        """Charges what the request used (``cost`` micro-credits, default its tokens at the flat price; at most the
        hold) and frees the rest; returns the cost charged."""
        cost = self.cost(charge.total_tokens) if cost is None else cost

        def work():
            with session_scope(self.engine) as session:
                usage = crud.settle_hold(
                    session,
                    hold_id=hold_id,
                    cost=cost,
                    kind=kind,
                    model=model,
                    key_id=key_id,
                    prompt_tokens=charge.prompt_tokens,
                    completion_tokens=charge.completion_tokens,
                )
                return 0 if usage is None else usage.cost

        # shielded: a client that disconnects mid-stream cancels the request task, but its charge must still land
        return await asyncio.shield(self._run(work))

    async def release_stale(self) -> int:
        def work():
            with session_scope(self.engine) as session:
                return crud.release_stale_holds(session, older_than=timedelta(seconds=self.hold_timeout))

        return await self._run(work)
