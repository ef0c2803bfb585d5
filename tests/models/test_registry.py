"""The family registry: discovery of the family subpackages, and conflicts between families."""

from __future__ import annotations

import pytest

from nectar.models import get_family, register_family, supported_model_types
from nectar.models.families.llama import LlamaFamily
from nectar.models.registry import families


def test_builtin_families_are_discovered():
    assert {"llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom", "gemma2", "falcon"} <= set(families())
    assert {"llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom", "gemma2", "falcon"} <= set(
        supported_model_types()
    )
    # the Llama-shaped families reuse the Llama family's code, each registered by its own subpackage
    for name in ("mistral", "qwen2", "qwen3", "mixtral"):
        family = get_family(name)
        assert family.name == name and isinstance(family, LlamaFamily) and family is not get_family("llama")


def test_a_model_type_cannot_belong_to_two_families():
    class Impostor(LlamaFamily):
        name = "impostor"
        model_types = ("bloom",)

    with pytest.raises(ValueError, match="already served by family 'bloom'"):
        register_family(Impostor())
    assert get_family("bloom").name == "bloom"
