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

import os

# numpy's OpenBLAS (used for some CPU products, nectar.models.cpu_blas) keeps its worker threads spinning ~0.1 s after
# each call; in a swarm on one machine they steal the cores of the next process on the route (measured: 2-thread nodes
# at half speed). Not a Nectar setting (those are nectar.settings, never read at import): OpenBLAS reads its own
# environment once, when numpy loads, and offers no other channel, so this is set here, before any nectar module can
# import numpy, for library users too (not only the `nectar` command). An explicit setting wins; children inherit it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
