"""Qwen2 family (Qwen2 and Qwen2.5 checkpoints): Llama-shaped blocks with biases on the query/key/value projections,
which the Llama family's fused kernels compute, so these blocks take its batched, graph and C decode routes."""

from nectar.models.families.qwen2.model import Qwen2Family
from nectar.models.registry import register_family

register_family(Qwen2Family())

__all__ = ["Qwen2Family"]
