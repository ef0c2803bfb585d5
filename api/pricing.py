"""``Pricing``: what the gateway charges for a generation, from what its route costs at the nodes.

A node charges its announced price (credit wei per token per block) for every token it computes: the ``n`` rows of a
request each run the prompt, a fine-tuned model's soft prompt is computed too, and a failover replays a span's
history to the replacement node. So the gateway quotes the route before any work (``Quote.price``: wei per token
through every block), holds the worst case of that (every row's soft prompt + prompt + ``max_tokens`` positions,
plus a share for failover replays) times ``1 + margin``, lets the client spend at most the held budget (its
``CostMeter`` stops the generation before a step that would pass it), and charges what the receipts it accepted
cost, times ``1 + margin``, rounded up to a micro-credit; never more than the hold. ``price_per_token`` (micro-credits
per billed token) is a floor under that charge: the gateway's own costs where the nodes are free or very cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from nectar.api.core.config import WEI_PER_MICRO, Settings, micro_to_credits


@dataclass(frozen=True)
class Hold:
    """A request's quote: what to hold (micro-credits) and the budget its generation may spend at the nodes (wei)."""

    amount: int
    budget_wei: int
    route_price: int  # credit wei per token through every block
    node_tokens: int  # rows x positions the nodes may compute at most (before replays)
    billed_tokens: int  # prompt + completion tokens as usage counts them, at most

    def describe(self) -> str:
        return (
            f"up to {self.node_tokens} tokens through a route at {self.route_price} credit wei per token (n rows "
            f"each run the prompt; soft prompts and failover replays included)"
        )


@dataclass(frozen=True)
class Pricing:
    margin: Fraction  # charged on top of what the nodes charge
    replay_share: Fraction  # of the worst case, kept in the budget for failover replays
    floor: int  # micro-credits per billed token, at least
    max_route_price: int | None  # credit wei per token through every block; dearer routes are not taken

    @classmethod
    def from_settings(cls, settings: Settings) -> Pricing:
        return cls(
            margin=Fraction(str(settings.price_margin)),
            replay_share=Fraction(str(settings.failover_reserve)),
            floor=settings.price_per_token,
            max_route_price=settings.max_route_price or None,
        )

    def to_micro(self, wei: int) -> int:
        """Micro-credits charged for ``wei`` of node work: with the margin, rounded up."""
        return math.ceil(wei * (1 + self.margin) / WEI_PER_MICRO)

    def hold(self, *, route_price: int, node_tokens: int, billed_tokens: int) -> Hold:
        budget = math.ceil(node_tokens * route_price * (1 + self.replay_share))
        amount = max(self.to_micro(budget), self.floor * billed_tokens)
        return Hold(amount, budget, route_price, node_tokens, billed_tokens)

    def charge(self, *, receipts_wei: int, billed_tokens: int, hold: Hold) -> int:
        """The micro-credits a request pays: its receipts with the margin, at least the floor, at most the hold."""
        return min(hold.amount, max(self.to_micro(receipts_wei), self.floor * billed_tokens))

    def describe(self) -> str:
        floor = f", at least {micro_to_credits(self.floor)} credits per token" if self.floor else ""
        return f"the route's price + {float(self.margin):.0%}{floor}"
