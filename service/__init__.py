"""The service kit the ledger (``nectar.ledger``) and the API gateway (``nectar.api``) both build on; it imports
neither of them. Each service keeps its own Settings, models, migrations, routes and tasks.

- ``settings.py``    ``ServiceSettings``: the shared fields and the check that refuses devnet secrets in production
- ``db.py``          engine (SQLite pragmas: WAL, busy timeout, ``BEGIN IMMEDIATE``) and transaction scope
- ``columns.py``     column types and the constraint naming convention every Nectar database uses
- ``migrations.py``  ``Migrations``: one service's Alembic history, its ``env.py`` body, the upgrade-on-start lock
- ``celery_app.py``  the Celery app factories (worker and producer-only)
- ``domain.py``      the EIP-712 domain of a deployment file, re-read when the file changes
- ``body_limit.py``  ``BodyLimit``: refuses (413) a body over a limit by the bytes read, chunked ones included
"""
