"""Settings (``config.py``) and the database engine (``db.py``) of the API gateway."""
