"""Mistral family: Llama-shaped blocks (``MistralDecoderLayer``) with a sliding attention window; everything but the
window is the Llama family's code (``nectar.models.families.llama``)."""

from nectar.models.families.mistral.model import MistralFamily
from nectar.models.registry import register_family

register_family(MistralFamily())

__all__ = ["MistralFamily"]
