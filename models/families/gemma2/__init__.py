"""Gemma 2 family: ``config.py`` tensor names, ``block.py`` the step runner (RoPE, a mask per layer type),
``model.py`` the family object registered here."""

from nectar.models.families.gemma2.model import Gemma2Family
from nectar.models.registry import register_family

register_family(Gemma2Family())

__all__ = ["Gemma2Family"]
