"""Model families, one subpackage each; importing this package imports (and so registers) all of them.

- ``llama/``  Llama-architecture decoders with GQA (llama, mistral): LlamaDecoderLayer / MistralDecoderLayer + RoPE
- ``bloom/``  BLOOM: BloomBlock + ALiBi
- ``gemma2/`` Gemma 2: Gemma2DecoderLayer (soft-capping, alternating sliding-window layers) + RoPE
- ``falcon/`` Falcon: FalconDecoderLayer (multi-query / grouped KV, parallel attention) + RoPE or ALiBi
"""

import importlib
import logging
import pkgutil

logger = logging.getLogger(__name__)

# Discover subpackages instead of listing them, so a new family is one new folder.
for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")
