"""Which verifiers and audit source the ledger's spot checks use, from settings: local spans, or nodes of the swarm.

Apart from ``spot_check`` (the checks) and ``swarm_audit`` (reaching nodes), so neither imports the other back.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from nectar.ledger.core.config import Settings
from nectar.ledger.spot_check import AuditSource, LocalVerifier, Verifier
from nectar.ledger.swarm_audit import swarm_verifiers

AUDIT_SOURCES = {"swarm": "nectar.ledger.swarm_audit:audit_from_settings"}  # short names


def load_audit_source(settings: Settings) -> AuditSource | None:
    """The AuditSource named by ``NECTAR_LEDGER_AUDIT_SOURCE`` ("swarm" or "module:factory", called with settings)."""
    if not settings.audit_source:
        return None
    module_name, _, attribute = AUDIT_SOURCES.get(settings.audit_source, settings.audit_source).partition(":")
    return getattr(importlib.import_module(module_name), attribute)(settings)


def make_verifiers(settings: Settings) -> list[Verifier]:
    """The two verifiers ``NECTAR_LEDGER_SPOT_CHECK_VERIFIER`` asks for; swarm verifiers fall back to local spans
    only when ``models_dir`` is set (a swarm-only ledger need not hold any model)."""
    if settings.spot_check_verifier == "swarm":
        return swarm_verifiers(settings, fallback=local_verifiers(settings) if settings.models_dir else None)
    return local_verifiers(settings)


def local_verifiers(settings: Settings) -> list[Verifier]:
    """Two local verifiers over the models in ``models_dir`` (each folder name is the model name)."""
    root = settings.models_dir
    models = {p.name: p for p in Path(root).iterdir() if p.is_dir()} if root else {}
    if not models:
        from nectar.models import list_models

        models = {m.name: m.name for m in list_models() if getattr(m, "converted", True)}
    adapters = [p for p in Path(settings.adapters_dir).iterdir() if p.is_dir()] if settings.adapters_dir else []
    return [LocalVerifier(models, name=name, adapters=adapters) for name in ("local-a", "local-b")]
