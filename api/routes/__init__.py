"""Routers, one module per endpoint family; ``api_router`` collects them (template ``api/main.py``).

``completions`` (completions + chat), ``models``, ``files``, ``fine_tuning``, ``accounts`` (+ admin), ``market``
(swarm view, series, node views), ``monitor`` (the HTML page, health); ``responses`` documents error answers.
"""

from fastapi import APIRouter

from nectar.api.routes import accounts, completions, files, fine_tuning, market, models, monitor

api_router = APIRouter()
for _router in (
    completions.router,
    models.router,
    files.router,
    fine_tuning.router,
    accounts.router,
    accounts.admin_router,
    market.router,
    monitor.router,
):
    api_router.include_router(_router)

__all__ = ["api_router"]
