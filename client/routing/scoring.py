"""Route-cost hooks: price, reputation and stake make a peer cheaper or dearer to route through, and the stake gate
keeps unstaked peers out of routes altogether."""

from __future__ import annotations

from abc import ABC, abstractmethod

from hivemind.p2p import PeerID

from nectar.wire.announce import ServerInfo

STAKE_WEIGHT = 0.5  # exponent on sqrt(stake / minStake) in the cost factor
STAKE_CAP = 16.0  # stake beyond this many times the minimum buys no more traffic


def stake_factor(bonded: int, min_stake: int, *, weight: float = STAKE_WEIGHT, cap: float = STAKE_CAP) -> float:
    """A hop's cost multiplier for its bonded stake: 1.0 at the minimum stake, falling as (stake / minimum) ** (-weight
    / 2), no lower than cap ** (-weight / 2) (0.5 by default, reached at 16x the minimum).

    Concave and capped on purpose: stake is a bond against cheating, not a measure of speed or quality, so it only
    breaks near-ties. Linear weight would let a whale buy all the traffic (one operator then holds the whole swarm's
    sessions, which is what staking is meant to prevent), and a node staked 1000x the minimum is no more honest than
    one at 16x. Under the defaults a node twice as fast as a whale at the minimum stake still wins its route."""
    if min_stake <= 0 or weight == 0:
        return 1.0
    ratio = min(max(bonded / min_stake, 1.0), cap)
    return ratio ** (-weight / 2)


class PeerScorer(ABC):
    """Multiplies a hop's base cost (seconds); a value > 1 avoids the peer, < 1 prefers it. Must be fast."""

    @abstractmethod
    def cost_factor(self, peer_id: PeerID, info: ServerInfo) -> float: ...

    def eligible(self, peer_id: PeerID, info: ServerInfo) -> bool:
        """Whether routes may use the peer at all (the stake gate); every peer by default."""
        return True

    def ineligible_reason(self, peer_id: PeerID, info: ServerInfo) -> str:
        """Why ``eligible`` said no (for errors)."""
        return ""


class NoScorer(PeerScorer):
    """Default: every peer is judged by speed alone."""

    def cost_factor(self, peer_id: PeerID, info: ServerInfo) -> float:
        return 1.0
