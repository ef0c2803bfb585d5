"""Routing: which peers serve which blocks, and which chain of them a request takes.

- ``spans.py``            RemoteSpan (one hop of a route) and how DHT records become spans
- ``scoring.py``          PeerScorer hook: price and reputation adjust route costs (the ledger fills it in)
- ``reputation.py``       ReputationScorer: the ledger's reputation scores (over HTTP) and prices as route costs
- ``sequence_manager.py`` RemoteSequenceManager: the swarm view, route finding, bans with backoff
"""

from nectar.client.routing.reputation import ReputationScorer
from nectar.client.routing.scoring import NoScorer, PeerScorer
from nectar.client.routing.sequence_manager import MissingBlocksError, RemoteSequenceManager
from nectar.client.routing.spans import RemoteSpan

__all__ = ["MissingBlocksError", "NoScorer", "PeerScorer", "RemoteSequenceManager", "RemoteSpan", "ReputationScorer"]
