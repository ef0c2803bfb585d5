"""Falcon family: ``config.py`` tensor names, ``block.py`` the step runner (RoPE or ALiBi), ``model.py`` the family
object registered here."""

from nectar.models.families.falcon.model import FalconFamily
from nectar.models.registry import register_family

register_family(FalconFamily())

__all__ = ["FalconFamily"]
