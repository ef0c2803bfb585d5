"""The paid OpenAI-compatible API gateway (``nectar api``): a swarm client that meters accounts per token.

- ``main.py``          ``create_app(settings)``: startup (migrations, swarm, background loops), middleware, OpenAPI
- ``routes/``          thin routers per endpoint family; ``deps.py``: app state, auth, rate limits (Annotated deps)
- ``serving/``         the logic: completions, chat, models, files + fine-tuning, accounts, market
- ``protocol.py``      OpenAI wire schemas; ``schemas.py``: Nectar's own (accounts, market); ``errors.py``: ApiError
- ``engine.py``        one swarm client per served model, generation in worker threads; ``text.py``: stop strings
- ``billing.py``       holds and charges; ``crud.py``: database operations; ``models.py`` + ``alembic/``: tables
- ``chain_watch.py``   credits escrow deposits to accounts, devnet faucet, records settlements for the monitor
- ``ratelimit.py``     per-key limits (in process or Redis)
- ``worker.py``        the Celery app (queue ``nectar-api``); ``tasks.py``: the fine-tuning task; ``training.py``
                       + ``training_data.py``: the prompt-tuning loop and the JSONL format
- ``static/``          the swarm monitor page (HTML + JS + CSS, no build step)
- ``core/``            Settings (``NECTAR_API_*``); ``migrations.py``: ``run_migrations``; engine, sessions and
                       Celery come from ``nectar.service``; ``cli.py``: ``nectar api [worker]``
"""
