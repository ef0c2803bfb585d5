"""The one rule for a list of swarm peers: multiaddrs separated by commas and/or whitespace, or a swarm file.

Every CLI, the client, the API and the ledger read ``--initial-peers``, ``--swarm``, ``NECTAR_INITIAL_PEERS`` and
``NECTAR_SWARM`` through here. The entry point hands its environment and the swarm file's bytes in
(``nectar.cli_kit.swarm_file`` reads it): nothing under ``wire/`` reads the environment or a file itself.

A swarm file names a swarm, so joining a public one is one flag (``--swarm public.toml``). TOML, JSON or YAML::

    name = "nectar-public"
    initial_peers = ["/dns4/boot1.example.org/tcp/31337/p2p/12D3KooW..."]
    model = "smollm2-135m"                  # optional: the default --model of nodes and clients
    ledger_url = "https://ledger.example.org"  # optional: the default --ledger-url of nodes

Its contents are someone else's claims: every field is checked, unknown keys are refused (a typo must not pass
silently), and the file is read only up to ``MAX_SWARM_FILE_BYTES``.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hivemind.utils.multiaddr import Multiaddr

ENV_VAR = "NECTAR_INITIAL_PEERS"
SWARM_ENV_VAR = "NECTAR_SWARM"
MAX_SWARM_FILE_BYTES = 64 * 1024
MAX_SWARM_PEERS = 64
_SWARM_KEYS = {"name", "initial_peers", "model", "ledger_url", "description"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
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


class SwarmFileError(ValueError):
    """A swarm file that cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class SwarmFile:
    path: Path
    name: str
    initial_peers: list[str]
    model: str | None = None
    ledger_url: str | None = None
    description: str = ""


def _parse_swarm_text(path: Path, text: str):
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(text)
    if suffix in (".yaml", ".yml"):
        import yaml  # transformers depends on PyYAML

        return yaml.safe_load(text)
    if suffix == ".toml":
        return tomllib.loads(text)
    try:  # no telling suffix: TOML, else JSON
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return json.loads(text)


def parse_swarm(raw: bytes, source: str) -> SwarmFile:
    """Checks a swarm file's bytes (see the module's docstring; ``source`` names the file: its suffix picks the
    format); raises ``SwarmFileError`` saying what to fix. The caller reads the file (``nectar.cli_kit``): nothing
    under wire/ reads files."""
    path = Path(source)

    def fail(problem: str) -> SwarmFileError:
        return SwarmFileError(
            f'swarm file {path}: {problem}. A swarm file holds name = "..." and initial_peers = ["/ip4/.../tcp/'
            'PORT/p2p/PEER_ID", ...] (optionally model and ledger_url), as TOML, JSON or YAML'
        )

    if len(raw) > MAX_SWARM_FILE_BYTES:
        raise fail(f"larger than {MAX_SWARM_FILE_BYTES} bytes")
    try:
        data = _parse_swarm_text(path, raw.decode("utf-8"))
    except Exception as e:  # tomllib, json and yaml raise their own types
        raise fail(f"not valid TOML, JSON or YAML ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise fail("its top level must be a table / object")
    unknown = sorted(str(k)[:40] for k in data if k not in _SWARM_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_SWARM_KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail("name must be 1-64 letters, digits, '.', '_' or '-'")
    peers_value = data.get("initial_peers")
    if isinstance(peers_value, str):
        peers_value = [peers_value]
    if not isinstance(peers_value, list) or not all(isinstance(p, str) for p in peers_value):
        raise fail("initial_peers must be a list of multiaddr strings")
    try:
        peers = parse_peers(peers_value)
    except ValueError as e:
        raise fail(str(e)) from None
    if not 0 < len(peers) <= MAX_SWARM_PEERS:
        raise fail(f"initial_peers must list 1 to {MAX_SWARM_PEERS} peers, got {len(peers)}")
    missing_id = [p for p in peers if "/p2p/" not in p]
    if missing_id:
        raise fail(f"{missing_id[0]!r} lacks its peer id: end each address with /p2p/PEER_ID")
    model, ledger_url, description = data.get("model"), data.get("ledger_url"), data.get("description", "")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 200):
        raise fail("model must be a model name (a string)")
    if ledger_url is not None and (
        not isinstance(ledger_url, str) or not re.match(r"^https?://[^\s]{1,500}$", ledger_url)
    ):
        raise fail("ledger_url must be an http:// or https:// URL")
    if not isinstance(description, str) or len(description) > 1000:
        raise fail("description must be a string of at most 1000 characters")
    return SwarmFile(path, name, peers, model, ledger_url, description)


def initial_peers(
    explicit: str | Sequence[str] | None = None, *, env: Mapping[str, str], swarm: SwarmFile | None = None
) -> list[str]:
    """The first of: the peers given explicitly (a flag, a config field), those of the swarm file ``swarm``
    (``--swarm`` or ``NECTAR_SWARM``, read by ``nectar.cli_kit.swarm_file``), those of ``NECTAR_INITIAL_PEERS``."""
    peers = parse_peers(explicit)
    if peers:
        return peers
    if swarm is not None:
        return list(swarm.initial_peers)
    return parse_peers(env.get(ENV_VAR))
