"""Route-cost hooks: price and reputation make a peer cheaper or dearer to route through."""

from __future__ import annotations

from abc import ABC, abstractmethod

from hivemind.p2p import PeerID

from nectar.wire.announce import ServerInfo


class PeerScorer(ABC):
    """Multiplies a hop's base cost (seconds); a value > 1 avoids the peer, < 1 prefers it. Must be fast."""

    @abstractmethod
    def cost_factor(self, peer_id: PeerID, info: ServerInfo) -> float: ...


class NoScorer(PeerScorer):
    """Default: every peer is judged by speed alone."""

    def cost_factor(self, peer_id: PeerID, info: ServerInfo) -> float:
        return 1.0
