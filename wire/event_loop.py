"""The event loop behind a node's and a client's network streams: uvloop where installed, else asyncio's own.

Every inference step crosses each loop several times (read, unpack, reply, write), so the loop's own overhead is
part of every hop. ``NECTAR_EVENT_LOOP=asyncio`` keeps the standard loop (for comparisons, or if uvloop misbehaves).
"""

from __future__ import annotations

import asyncio
import logging

from nectar.settings import current

logger = logging.getLogger(__name__)


def loop_kind() -> str:
    """``uvloop`` or ``asyncio``: what ``new_event_loop`` builds under the current settings (``NECTAR_EVENT_LOOP``)."""
    choice = current().event_loop
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError("NECTAR_EVENT_LOOP=uvloop, but uvloop is not installed: pip install uvloop")
        return "asyncio"
    return "uvloop"


def new_event_loop() -> asyncio.AbstractEventLoop:
    if loop_kind() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
