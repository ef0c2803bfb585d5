"""FastAPI dependencies: the services built once at startup, fetched from app state."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from nectar.ledger.core.config import Settings
from nectar.ledger.stakes import ReadCache, StakeBook
from nectar.service.db import session_scope
from nectar.service.domain import DomainProvider

logger = logging.getLogger(__name__)


@dataclass
class LedgerState:
    settings: Settings
    engine: Engine
    domains: DomainProvider
    celery: object | None = None  # producer-only Celery app, built on first use
    stakes: StakeBook | None = None  # the registry of the deployment (stake gate)
    _chain: object | None = None  # nectar.chain.Chain of the deployment, built on first use (GET /v1/backing)
    reads: ReadCache | None = None  # answers of the public chain-reading routes (backing, one node's stake)

    def __post_init__(self):
        if self.reads is None:
            self.reads = ReadCache(
                ttl=self.settings.chain_read_cache_s,
                max_keys=self.settings.chain_read_cache_keys,
                per_second=self.settings.chain_reads_per_second,
            )

    def chain(self):
        """The deployment's chain, rebuilt when the deployment file changes (a devnet restart)."""
        from nectar.chain import Chain

        stamp = self.settings.deployment_path.stat().st_mtime_ns if self.settings.deployment_path.exists() else None
        if self._chain is None or self._chain[0] != stamp:
            self._chain = (stamp, Chain.from_deployment(self.settings.deployment_path))
        return self._chain[1]

    def read_reserve(self, client: str, node: str) -> int | None:
        """``client``'s reserve for ``node`` less what it asked to release, from the chain (None: no chain or it
        cannot be read now; the caller counts on settled payments alone)."""
        if not self.settings.deployment_path.exists():
            return None
        try:
            reserve = self.chain().reserve_of(client, node)
        except Exception as e:  # unreachable chain: nothing more is counted until it answers
            logger.warning(f"Reserve of {client} at {node}: chain read failed: {type(e).__name__}: {e}")
            return None
        return max(int(reserve["amount"]) - int(reserve["pendingRelease"]), 0)


def get_state(request: Request) -> LedgerState:
    return request.app.state.ledger


def get_session(state: Annotated[LedgerState, Depends(get_state)]) -> Iterator[Session]:
    with session_scope(state.engine) as session:
        yield session


def is_admin(state: LedgerState, authorization: str | None) -> bool:
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {state.settings.admin_token}".encode())


def require_admin(state: Annotated[LedgerState, Depends(get_state)], authorization: str | None = Header(default=None)):
    if not is_admin(state, authorization):
        raise HTTPException(401, "admin endpoint: send 'Authorization: Bearer <NECTAR_LEDGER_ADMIN_TOKEN>'")


StateDep = Annotated[LedgerState, Depends(get_state)]
SessionDep = Annotated[Session, Depends(get_session)]
AdminDep = Annotated[None, Depends(require_admin)]
