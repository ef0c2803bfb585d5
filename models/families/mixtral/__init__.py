"""Mixtral family: Llama-shaped blocks whose MLP is a sparse mixture of experts (a router picks the top-k experts
per token). The fused kernels have no experts: these blocks take the generic path. Checkpoints store one matrix per
expert (``block_sparse_moe.experts.<e>.w1/w2/w3``); ``model.py`` stacks them into transformers' layout at load."""

from nectar.models.families.mixtral.model import MixtralFamily
from nectar.models.registry import register_family

register_family(MixtralFamily())

__all__ = ["MixtralFamily"]
