"""HTTP routes of the ledger: thin handlers over ``intake``, ``crud`` and ``reputation``."""
