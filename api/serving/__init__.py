"""Serving classes: the logic behind each endpoint family (routes only turn their results into JSON or SSE).

- ``base.py``         ``OpenAIServing``: the startup context, model checks, context checks
- ``generation.py``   ``GenerationServing``: reserve, run on the swarm, settle; whole or streamed (SSE)
- ``completions.py``  ``/v1/completions``;  ``chat.py``: ``/v1/chat/completions``;  ``models.py``: ``/v1/models``
- ``fine_tuning.py``  ``/v1/files`` and ``/v1/fine_tuning/jobs``
- ``accounts.py``     accounts, keys, funding, usage;  ``market.py``: swarm view, series, node views
"""
