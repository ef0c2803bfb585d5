"""The Nectar client SDK.

- ``model.py``              DistributedModelForCausalLM: local embeddings/head, remote blocks, generate()
- ``inference_session.py``  sessions with server-side KV caches: routing, failover by replay
- ``hop_stream.py``         one hop of a session: its inference stream to one node, its state and history
- ``push_mode.py``          steps sent to every hop at once, each hop pushing its output to the next
- ``remote_sequential.py``  differentiable forward/backward through the swarm (prompt tuning)
- ``routing/``              swarm view, route finding, price/reputation hook
- ``payments.py``           receipt checks and cumulative vouchers
- ``pricing.py``            route quotes, a generation's cost meter and budget
- ``errors.py``             the named errors the client raises (no route, node error, bad receipt, ...)
- ``generation.py``         sampling and stopping rules
- ``config.py``             ClientConfig
"""

from nectar.client.config import ClientConfig
from nectar.client.errors import (
    InferenceFailedError,
    NectarClientError,
    NodeBusyError,
    PaymentRequiredError,
    ReceiptRejectedError,
    RouteUnavailableError,
    SessionClosedError,
)
from nectar.client.inference_session import InferenceSession
from nectar.client.model import DistributedModelForCausalLM
from nectar.client.payments import ReceiptError, Wallet
from nectar.client.pricing import BudgetExceededError, CostMeter, Quote, RouteTooExpensiveError, route_price
from nectar.client.routing import MissingBlocksError, NoScorer, PeerScorer, RemoteSequenceManager

__all__ = [
    "BudgetExceededError",
    "CostMeter",
    "Quote",
    "RouteTooExpensiveError",
    "route_price",
    "ClientConfig",
    "DistributedModelForCausalLM",
    "InferenceFailedError",
    "InferenceSession",
    "MissingBlocksError",
    "NectarClientError",
    "NodeBusyError",
    "NoScorer",
    "PaymentRequiredError",
    "PeerScorer",
    "ReceiptError",
    "ReceiptRejectedError",
    "RemoteSequenceManager",
    "RouteUnavailableError",
    "SessionClosedError",
    "Wallet",
]
