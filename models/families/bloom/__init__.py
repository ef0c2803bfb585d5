"""BLOOM family: ``config.py`` tensor names, ``block.py`` the step runner (ALiBi), ``model.py`` the family object
registered here."""

from nectar.models.families.bloom.model import BloomFamily
from nectar.models.registry import register_family

register_family(BloomFamily())

__all__ = ["BloomFamily"]
