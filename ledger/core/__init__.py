"""Ledger core: settings (``config``) and the database engine (``db``)."""
