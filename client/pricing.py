"""What a generation costs at the nodes: route quotes and a per-generation cost meter with a budget.

A node charges ``price_per_token`` credit wei per token per block it computes, so a route's price is the sum over its
spans of price x blocks, per token each step sends through it (rows x new positions). A session's ``CostMeter``
counts, exactly, the receipts its hops accepted (replays after a failover included), and before any work is sent it
commits that work's cost at the hops' announced prices: with a budget, work that would take the committed total past
it is never sent (``BudgetExceededError``), and routes dearer per token than the budget allows are never taken.
One meter may serve several sessions (a request's prompts); the wallet's own totals are shared by every generation.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from nectar.client.errors import NectarClientError

if TYPE_CHECKING:  # routing imports this module
    from nectar.client.routing.spans import RemoteSpan


class BudgetExceededError(NectarClientError):
    """The next piece of work would take a generation past its ``max_cost_wei``: it was not sent."""


class RouteTooExpensiveError(NectarClientError):
    """Every route the swarm offers for some blocks costs more per token than the caller allows.

    :ivar price: the cheapest route's price (credit wei per token), :ivar cap: what was allowed"""

    def __init__(self, message: str, *, price: int, cap: int):
        super().__init__(message)
        self.price, self.cap = price, cap


def route_price(route: Sequence[RemoteSpan]) -> int:
    """Credit wei per token through ``route``: the sum over its spans of the node's announced price x blocks."""
    return sum(max(int(span.info.price_per_token), 0) * span.length for span in route)


@dataclass(frozen=True)
class Quote:
    """The price of the route a generation would take now (``price``: credit wei per token through every block)."""

    route: tuple[RemoteSpan, ...]
    price: int

    def worst_case(self, *, batch_size: int, max_length: int, replay_share: float = 0.0) -> int:
        """Credit wei a session of ``batch_size`` rows over ``max_length`` positions (soft prompt, prompt and new
        tokens) can cost at this price: every position of every row through every block, plus ``replay_share`` of
        that for failover replays (a replay re-sends a span's history to its replacement)."""
        return math.ceil(batch_size * max_length * self.price * (1 + Fraction(str(replay_share))))


class CostMeter:
    """The cost of one generation at the nodes, in credit wei; thread-safe.

    ``spent``: the sum of the receipts its sessions accepted. ``committed``: the cost of every step and replay sent at
    the hops' announced prices (what their receipts can charge at most; ``spent <= committed``).

    :param max_cost_wei: the budget: no work is sent that would take ``committed`` past it (None: no budget)
    :param max_price: the most credit wei per token a route may cost (an operator's cap; None: no cap)
    """

    def __init__(self, max_cost_wei: int | None = None, *, max_price: int | None = None):
        if max_cost_wei is not None and max_cost_wei < 0:
            raise ValueError("max_cost_wei must be >= 0")
        self.max_cost_wei, self.max_price = max_cost_wei, max_price
        self.spent = 0
        self.committed = 0
        self.receipts = 0
        self._open = 0
        self._sealed = False
        self._idle = threading.Condition()

    @property
    def remaining(self) -> int | None:
        return None if self.max_cost_wei is None else max(self.max_cost_wei - self.committed, 0)

    def price_cap(self, tokens: int) -> int | None:
        """The most a route may cost per token for a session of ``tokens`` (rows x positions): the operator's cap
        and the budget left spread over those tokens, whichever is lower."""
        left = self.remaining
        caps = [c for c in (self.max_price, None if left is None else left // max(tokens, 1)) if c is not None]
        return min(caps) if caps else None

    def commit(self, amount: int, what: str) -> None:
        """Counts ``amount`` wei of work about to be sent; raises ``BudgetExceededError`` (sending nothing) if it would
        take the generation past its budget, or if the meter was sealed (its generation was settled)."""
        with self._idle:
            if self._sealed:
                raise BudgetExceededError(f"{what}: this generation was already settled; no more work is paid for")
            if self.max_cost_wei is not None and self.committed + amount > self.max_cost_wei:
                raise BudgetExceededError(
                    f"{what} would cost {amount} wei, and {self.committed} of this generation's budget of "
                    f"{self.max_cost_wei} wei is committed: stopped before it (raise max_cost_wei to go further)"
                )
            self.committed += amount

    def accept(self, amount: int) -> None:
        """A receipt of this generation passed the client's checks."""
        with self._idle:
            self.spent += amount
            self.receipts += 1

    def opened(self) -> None:
        with self._idle:
            self._open += 1

    def closed(self) -> None:
        with self._idle:
            self._open -= 1
            self._idle.notify_all()

    def settle(self, timeout: float) -> int:
        """Waits (at most ``timeout`` s) until every session on the meter closed, seals it (no more work may be sent)
        and returns what the generation owes: ``spent``, or ``committed`` if a session is still open (its last
        receipts may still come, and are never more)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._open > 0 and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            self._sealed = True
            return self.spent if self._open == 0 else max(self.spent, self.committed)
