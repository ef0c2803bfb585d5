"""The ledger: verifies and stores receipts and vouchers, closes epochs, settles on chain, spot-checks, scores nodes.

Files:

- ``core/config.py``  Settings (``NECTAR_LEDGER_*``); ``core/db.py``: engine, sessions, migrations on start
- ``models.py``       tables; ``crud.py``: keyword-only database operations; ``alembic/``: migrations
- ``intake.py``       stateless checks of a submitted receipt or voucher (signature, signer, amount, fingerprint)
- ``service.py``      the FastAPI app; ``routes/``: submissions, nodes/reputation, epochs, health; ``deps.py``
- ``settlement.py``   ``EpochSettler``: closed -> root_committed -> settled, crash-safe against the chain
- ``worker.py``       the Celery app from Settings (beat schedule, task names); ``tasks.py``: the tasks
- ``spot_check.py``   post-hoc re-execution of a random fraction of steps; ``reputation.py``: node scores
- ``client.py``       ``LedgerClient`` (HTTP); ``node_policy.py``: ``LedgerPaymentPolicy`` for nodes
- ``cli.py``          ``nectar ledger`` and ``nectar worker``
"""
from nectar.ledger.client import LedgerClient, LedgerError

__all__ = ["LedgerClient", "LedgerError"]
