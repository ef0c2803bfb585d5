"""The ledger: verifies and stores receipts and vouchers, closes epochs, settles on chain, spot-checks, scores nodes.

Files:

- ``core/config.py``  Settings (``NECTAR_LEDGER_*``); the engine, sessions and Celery factory are ``nectar.service``'s
- ``models.py``       tables; ``crud.py``: keyword-only database operations; ``alembic/``: migrations
- ``intake.py``       stateless checks of a submitted receipt or voucher (signature, signer, amount, fingerprint)
- ``service.py``      the FastAPI app; ``routes/``: submissions, nodes/reputation, epochs, health; ``deps.py``
- ``settlement.py``   ``EpochSettler``: closed -> root_committed -> settled, crash-safe against the chain
- ``worker.py``       the Celery app from Settings (beat schedule, task names); ``tasks.py``: the tasks
- ``migrations.py``   its Alembic history and ``run_migrations`` (service and worker call it on start)
- ``spot_check.py``   post-hoc re-execution of a random fraction of steps; ``reputation.py``: node scores
- ``swarm.py``        the ledger's own DHT peer (node address -> peer, who serves what, RPC calls)
- ``swarm_audit.py``  ``RpcAuditSource`` (nodes' audit RPC) and ``SwarmVerifier`` (re-execution on other nodes)
- ``slashing.py``     attest failed spot checks on chain, finalize slashes after the dispute window
- ``cli.py``          ``nectar ledger`` and ``nectar worker``

Its HTTP API as others see it (routes, JSON shapes, ``LedgerClient``, the nodes' ``LedgerPaymentPolicy``) lives in
``nectar.wire.ledger_api``.
"""
