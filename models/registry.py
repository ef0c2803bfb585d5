"""Model family registry: ``config.model_type`` -> ``ModelFamily``.

Each family subpackage under ``nectar.models.families`` calls ``register_family`` in its ``__init__``; the families
package imports every subpackage it contains, so adding a family touches no other file.
"""

from __future__ import annotations

import importlib
import logging
import threading

from transformers import PretrainedConfig

from nectar.models.errors import UnsupportedModelError
from nectar.models.family import ModelFamily

logger = logging.getLogger(__name__)

_FAMILIES: dict[str, ModelFamily] = {}  # family name -> family
_BY_MODEL_TYPE: dict[str, ModelFamily] = {}
_discovery_lock = threading.Lock()
_discovered = False


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family; its ``model_types`` must not already belong to another family."""
    for model_type in family.model_types:
        owner = _BY_MODEL_TYPE.get(model_type)
        if owner is not None and owner.name != family.name:
            raise ValueError(f"model_type {model_type!r} is already served by family {owner.name!r}")
    _FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    logger.debug("Registered model family %s for %s", family.name, family.model_types)
    return family


def _discover() -> None:
    # Imported lazily: the family packages import this module to register themselves.
    global _discovered
    with _discovery_lock:
        if not _discovered:
            importlib.import_module("nectar.models.families")
            _discovered = True


def families() -> dict[str, ModelFamily]:
    _discover()
    return dict(_FAMILIES)


def supported_model_types() -> list[str]:
    _discover()
    return sorted(_BY_MODEL_TYPE)


def get_family(config: PretrainedConfig | str) -> ModelFamily:
    """The family serving ``config.model_type`` (or a model_type string); UnsupportedModelError if none does."""
    _discover()
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by Nectar. Supported model types: "
            f"{', '.join(supported_model_types())}. Use a checkpoint of one of these architectures, or add a family "
            f"subpackage under nectar/models/families/ that calls register_family()."
        )
    return family
