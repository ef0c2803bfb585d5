"""``BlockSpan``: a contiguous range of a model's transformer blocks, loaded alone, run with or without a KV cache."""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from nectar.models.attention import AttentionStep
from nectar.models.cache import SpanCache
from nectar.models.checkpoint import Checkpoint
from nectar.models.errors import CacheError, CheckpointError, SpanRangeError
from nectar.models.family import BlockRunner, ModelFamily
from nectar.models.prequant import check_requested, checkpoint_quantization, load_prequantized_block
from nectar.models.quant import check_quantization, quantize_block
from nectar.models.registry import get_family

logger = logging.getLogger(__name__)


class BlockSpan(nn.Module):
    """Blocks ``[start, end)`` of one model; what a node hosts and runs for clients.

    ``forward`` without a cache is a full causal pass from position 0 (training, stateless prefill; gradients flow to
    ``hidden_states`` and ``prompts``, the weights are frozen). With a ``SpanCache`` the new tokens sit after the
    cached ones and their keys/values are appended (inference, no gradients).

    Build with ``load_span``; the constructor takes already-loaded blocks.
    """

    def __init__(
        self,
        *,
        config: PretrainedConfig,
        family: ModelFamily,
        blocks: list[nn.Module],
        runner: BlockRunner,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: torch.device | str,
        quantization: str = "none",
    ):
        super().__init__()
        self.config = config
        self.family = family
        self.blocks = nn.ModuleList(blocks)
        self.runner = runner
        self.start, self.end = start, end
        self.dtype = dtype
        self.quantization = quantization  # weight quantization of the blocks' linear layers (nectar.models.quant)
        self.device = _concrete_device(device)
        self.kv_layout = family.kv_layout(config)
        self.requires_grad_(False)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def new_cache(self, batch_size: int, max_length: int) -> SpanCache:
        """A cache for ``batch_size`` sequences of up to ``max_length`` tokens, on this span's dtype/device."""
        return SpanCache(
            num_blocks=self.num_blocks,
            batch_size=batch_size,
            max_length=max_length,
            num_heads=self.kv_layout.num_heads,
            head_dim=self.kv_layout.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def cache_bytes_per_token(self, batch_size: int = 1) -> int:
        """KV cache bytes one token costs across all blocks of this span (keys + values)."""
        per_block = 2 * self.kv_layout.num_heads * self.kv_layout.head_dim * self.dtype.itemsize
        return self.num_blocks * per_block * batch_size

    def forward(
        self, hidden_states: torch.Tensor, *, cache: SpanCache | None = None, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run ``hidden_states`` ``[B, T, H]`` through the blocks; returns ``[B, T, H]`` in the span's dtype.

        :param cache: append to this cache (positions start at ``cache.length``, which grows by T); None = stateless
        :param prompts: ``[num_blocks, B or 1, P, H]`` deep prompts, added before each block at absolute positions
            ``< P`` (only positions inside this step are touched)
        """
        hidden_states = self._check_hidden_states(hidden_states)
        if prompts is not None:
            prompts = self._check_prompts(prompts, hidden_states.shape[0])
        if cache is None:
            return self._run(hidden_states, AttentionStep(0, hidden_states.shape[1]), None, prompts)
        self._check_cache(cache, hidden_states.shape[0])
        step = AttentionStep(cache.length, hidden_states.shape[1])
        writer = cache.writer(step.query_length)
        # A cache allocated under inference_mode can only be written under it; any other cache just needs no autograd.
        with torch.inference_mode() if cache.is_inference else torch.no_grad():
            output = self._run(hidden_states, step, writer, prompts)
        cache.length = step.key_length
        return output

    def _run(self, hidden_states, step: AttentionStep, writer, prompts) -> torch.Tensor:
        inputs = self.runner.step_inputs(hidden_states, step)
        for local_index, block in enumerate(self.blocks):
            if prompts is not None:
                hidden_states = _add_prompt(hidden_states, prompts[local_index], step)
            hidden_states = self.runner.run_block(block, hidden_states, inputs, writer)
        return hidden_states

    def _check_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.hidden_size or hidden_states.shape[1] == 0:
            raise ValueError(
                f"hidden_states must be [batch, tokens>0, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        return hidden_states.to(device=self.device, dtype=self.dtype)

    def _check_prompts(self, prompts: torch.Tensor, batch_size: int) -> torch.Tensor:
        if (
            prompts.ndim != 4
            or prompts.shape[0] != self.num_blocks
            or prompts.shape[1] not in (1, batch_size)
            or prompts.shape[3] != self.hidden_size
        ):
            raise ValueError(
                f"prompts must be [{self.num_blocks} blocks, {batch_size} or 1, prefix length, {self.hidden_size}], "
                f"got {tuple(prompts.shape)}"
            )
        return prompts.to(device=self.device, dtype=self.dtype)

    def _check_cache(self, cache: SpanCache, batch_size: int) -> None:
        layout = (cache.num_blocks, cache.num_heads, cache.head_dim)
        if layout != (self.num_blocks, self.kv_layout.num_heads, self.kv_layout.head_dim):
            raise CacheError(f"{cache} was not made by this span's new_cache() ({self.extra_repr()})")
        if cache.dtype != self.dtype or cache.device != self.device:
            raise CacheError(f"cache is {cache.dtype} on {cache.device}, span is {self.dtype} on {self.device}")
        if batch_size != cache.batch_size:
            raise CacheError(f"hidden_states have batch {batch_size} but the cache was made for {cache.batch_size}")

    def extra_repr(self) -> str:
        quant = "" if self.quantization == "none" else f", quantization={self.quantization}"
        return (
            f"family={self.family.name}, blocks=[{self.start}, {self.end}), dtype={self.dtype}, device={self.device}"
            f"{quant}"
        )


def _concrete_device(device: torch.device | str) -> torch.device:
    """ "cuda" -> "cuda:0": the form tensors report, so device comparisons hold."""
    return torch.empty(0, device=device).device


def _add_prompt(hidden_states: torch.Tensor, prompt: torch.Tensor, step: AttentionStep) -> torch.Tensor:
    """Add ``prompt`` ``[B|1, P, H]`` to the rows of this step whose absolute position is below P (autograd-safe)."""
    first, last = step.past_length, min(prompt.shape[1], step.key_length)
    if first >= last:
        return hidden_states
    part = prompt[:, first:last]
    return hidden_states + F.pad(part, (0, 0, 0, step.query_length - part.shape[1]))


def check_span_range(start: int, end: int, num_blocks: int, *, model: str) -> None:
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= num_blocks):
        raise SpanRangeError(
            f"span [{start}, {end}) is out of bounds for {model}, which has {num_blocks} blocks: "
            f"choose 0 <= start < end <= {num_blocks}"
        )


def load_blocks(
    checkpoint: Checkpoint,
    *,
    config: PretrainedConfig,
    family: ModelFamily,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device | str,
    quantization: str = "none",
) -> list[nn.Module]:
    """Build blocks ``[start, end)`` on the meta device and fill them with exactly their tensors from ``checkpoint``;
    ``quantization`` (``nectar.models.quant``) then replaces their linear layers. A pre-quantized checkpoint
    (``nectar.models.prequant``) must be asked for with its own quantization; its codes load as stored."""
    stored = checkpoint_quantization(config)
    check_requested(stored, quantization, model=str(checkpoint.path))
    blocks = []
    for local_index, index in enumerate(range(start, end)):
        with torch.device("meta"):
            block = family.build_block_at(config, index, local_index)
        prefix = next((p for p in family.block_prefixes(index) if checkpoint.has_prefix(p)), None)
        if prefix is None:
            raise CheckpointError(
                f"{checkpoint.path} has no tensors for block {index} "
                f"(looked for names starting with {' or '.join(family.block_prefixes(index))})"
            )
        if stored is not None:
            block = load_prequantized_block(
                checkpoint, block, prefix, family=family, mode=stored, dtype=dtype, device=device
            )
            blocks.append(block.eval())
            continue
        tensors = family.load_block_tensors(checkpoint, prefix, list(block.state_dict()), dtype=dtype, device=device)
        block.load_state_dict(tensors, strict=True, assign=True)
        block = quantize_block(block.to(device=device, dtype=dtype), quantization, dtype)
        blocks.append(block.eval())
    return blocks


def load_span(
    path_or_name: str | os.PathLike,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: str = "none",
) -> BlockSpan:
    """Load blocks ``[start, end)`` of a model (built-in name or checkpoint folder), reading only their tensors.

    :param quantization: ``none`` | ``int8`` | ``nf4``: the blocks' linear layers' weights (``nectar.models.quant``);
      a pre-quantized checkpoint's own mode (``nectar.models.prequant``), else CheckpointError
    """
    from nectar.models.resolve import load_config, resolve_model

    began = time.perf_counter()
    path = resolve_model(path_or_name)
    config = load_config(path)
    family = get_family(config)
    family.prepare_config(config)
    check_span_range(start, end, family.num_blocks(config), model=str(path_or_name))
    check_quantization(quantization)
    checkpoint = Checkpoint(path)
    blocks = load_blocks(
        checkpoint,
        config=config,
        family=family,
        start=start,
        end=end,
        dtype=dtype,
        device=device,
        quantization=quantization,
    )
    runner = family.make_runner(config).to(device)
    span = BlockSpan(
        config=config,
        family=family,
        blocks=blocks,
        runner=runner,
        start=start,
        end=end,
        dtype=dtype,
        device=device,
        quantization=quantization,
    )
    logger.info("Loaded blocks [%d, %d) of %s in %.2fs", start, end, path, time.perf_counter() - began)
    return span
