"""Llama-architecture family (llama, mistral): ``config.py`` classes and tensor names, ``block.py`` the step runner,
``model.py`` the family object registered here."""
from nectar.models.families.llama.model import LlamaFamily
from nectar.models.registry import register_family

register_family(LlamaFamily())

__all__ = ["LlamaFamily"]
