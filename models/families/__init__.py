"""Model families, one subpackage each; importing this package imports (and so registers) all of them.

- ``llama/``    Llama-architecture decoders with GQA: LlamaDecoderLayer + RoPE; fused batched, graph and C routes
- ``mistral/``  MistralDecoderLayer: Llama's code plus a sliding window (generic path)
- ``qwen2/``    Qwen2DecoderLayer (Qwen2, Qwen2.5): q/k/v biases, which the fused routes compute
- ``qwen3/``    Qwen3DecoderLayer: q/k norms, which the fused batched and graph routes compute
- ``mixtral/``  MixtralDecoderLayer: a sparse mixture of experts (generic path); experts read per expert
- ``bloom/``    BLOOM: BloomBlock + ALiBi
- ``gemma2/``   Gemma 2: Gemma2DecoderLayer (soft-capping, alternating sliding-window layers) + RoPE
- ``falcon/``   Falcon: FalconDecoderLayer (multi-query / grouped KV, parallel attention) + RoPE or ALiBi
"""

import importlib
import logging
import pkgutil

logger = logging.getLogger(__name__)

# Discover subpackages instead of listing them, so a new family is one new folder.
for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")
