"""Llama-architecture family: ``config.py`` classes and tensor names, ``block.py`` the step runner, ``model.py`` the
family object registered here (also the base class of the mistral, qwen2, qwen3 and mixtral families).

Its fast path for a node's inference steps (``LlamaFamily.batch_runner``): ``fused.py`` the fused weights and shared
per-token maths, ``batching.py`` the batched forward (``LlamaBatchRunner``), ``graphs.py`` the graph-safe decode step
the node records as CUDA graphs, ``native_decode.py`` one session's decode step in C."""

from nectar.models.families.llama.model import LlamaFamily
from nectar.models.registry import register_family

register_family(LlamaFamily())

__all__ = ["LlamaFamily"]
