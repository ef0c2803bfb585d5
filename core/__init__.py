"""Nectar: a paid, verifiable swarm for running and fine-tuning LLMs.

Package map (each subpackage lives in its own top-level folder, see setup.py):

- ``nectar.wire``    neutral wire types shared by node and client: RPC messages, DHT records, receipts/vouchers
- ``nectar.models``  model families (Llama, BLOOM), span loading, the built-in model
- ``nectar.node``    the node: hosts block spans, serves inference/forward/backward over hivemind
- ``nectar.client``  the SDK: routing, inference sessions with failover, ``generate()``, prompt tuning
- ``nectar.chain``   every web3.py call, the devnet and the deployment file
- ``nectar.ledger``  receipts, vouchers, epochs, settlement, spot checks, reputation
- ``nectar.api``     the paid OpenAI-compatible API and the swarm monitor
"""

__version__ = "0.1.0"
