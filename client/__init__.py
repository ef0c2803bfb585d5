"""The Nectar client SDK.

- ``model.py``              DistributedModelForCausalLM: local embeddings/head, remote blocks, generate()
- ``inference_session.py``  sessions with server-side KV caches and failover by replay
- ``remote_sequential.py``  differentiable forward/backward through the swarm (prompt tuning)
- ``routing/``              swarm view, route finding, price/reputation hook
- ``payments.py``           receipt checks and cumulative vouchers
- ``generation.py``         sampling and stopping rules
- ``config.py``             ClientConfig
"""
from nectar.client.config import ClientConfig
from nectar.client.inference_session import InferenceSession
from nectar.client.model import DistributedModelForCausalLM
from nectar.client.payments import ReceiptError, Wallet
from nectar.client.routing import MissingBlocksError, NoScorer, PeerScorer, RemoteSequenceManager

__all__ = [
    "ClientConfig", "DistributedModelForCausalLM", "InferenceSession", "MissingBlocksError", "NoScorer",
    "PeerScorer", "ReceiptError", "RemoteSequenceManager", "Wallet",
]
