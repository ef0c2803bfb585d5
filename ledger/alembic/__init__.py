"""Alembic migrations of the ledger (a package so that a non-editable install ships them)."""
