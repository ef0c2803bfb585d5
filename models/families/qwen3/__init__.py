"""Qwen3 family: Llama-shaped blocks with RMSNorms on each query and key head (q/k norms), which the fused kernels
do not compute: these blocks take the generic path."""

from nectar.models.families.qwen3.model import Qwen3Family
from nectar.models.registry import register_family

register_family(Qwen3Family())

__all__ = ["Qwen3Family"]
