"""The one rule for a list of swarm peers: multiaddrs separated by commas and/or whitespace.

Every CLI, the client, the API and the ledger read ``--initial-peers`` and ``NECTAR_INITIAL_PEERS`` through here.
The entry point hands its environment in (``env=``): nothing under ``wire/`` reads the environment itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from hivemind.utils.multiaddr import Multiaddr

ENV_VAR = "NECTAR_INITIAL_PEERS"
_SEPARATORS = re.compile(r"[\s,]+")


def parse_peers(value: str | Sequence[str] | None) -> list[str]:
    """Multiaddrs from a string or a list of strings (each may hold several), in order, empty entries dropped.

    Raises ValueError naming an entry that is not a multiaddr."""
    if value is None:
        return []
    parts = [value] if isinstance(value, str) else list(value)
    peers = []
    for part in parts:
        if not isinstance(part, str):
            part = str(part)  # a Multiaddr object
        for entry in _SEPARATORS.split(part):
            if entry:
                peers.append(_checked(entry))
    return peers


def _checked(entry: str) -> str:
    problem = None
    if not entry.startswith("/"):
        problem = "it does not start with '/'"
    else:
        try:
            Multiaddr(entry)
        except Exception as e:  # the multiaddr package raises several types
            problem = str(e) or type(e).__name__
    if problem:
        raise ValueError(
            f"{entry!r} is not a peer multiaddr ({problem}): pass addresses like "
            "/ip4/1.2.3.4/tcp/31337/p2p/Qm..., as printed by `nectar dht` or `nectar node`, separated "
            "by spaces or commas"
        )
    return entry


def initial_peers(explicit: str | Sequence[str] | None = None, *, env: Mapping[str, str]) -> list[str]:
    """The peers given explicitly (a flag, a config field) if any, else those of ``NECTAR_INITIAL_PEERS`` in ``env``."""
    peers = parse_peers(explicit)
    return peers if peers else parse_peers(env.get(ENV_VAR))
