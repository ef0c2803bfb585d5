"""The span a node hosts: one ``BlockSpan`` per block, so a request may use any contiguous sub-span.

Pure compute, called on the compute thread only (see ``task_pool``); shapes are validated by the handler first.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from nectar.models import load_config, load_span

logger = logging.getLogger(__name__)


class SpanBackend:
    """Holds blocks [start, end) of a model and runs inference steps, forward and backward through sub-spans."""

    def __init__(self, model_path: Path, start: int, end: int, *, dtype: torch.dtype, device: str, show_progress=True):
        self.model_path, self.start, self.end = Path(model_path), start, end
        self.dtype, self.device = dtype, torch.device(device)
        self.config = load_config(model_path)
        began = time.perf_counter()
        self.blocks = [
            load_span(model_path, index, index + 1, dtype=dtype, device=device)
            for index in tqdm(range(start, end), desc=f"Loading blocks {start}:{end}", disable=not show_progress)
        ]
        for block in self.blocks:
            block.requires_grad_(False)
            block.eval()
        self.hidden_size = self.blocks[0].hidden_size
        logger.info(f"Loaded blocks {start}:{end} in {time.perf_counter() - began:.2f}s ({dtype}, {device})")

    def _local(self, start: int, end: int) -> list:
        return self.blocks[start - self.start : end - self.start]

    def cache_bytes_per_token(self, start: int, end: int, batch_size: int = 1) -> int:
        return sum(block.cache_bytes_per_token(batch_size) for block in self._local(start, end))

    def new_caches(self, start: int, end: int, batch_size: int, max_length: int) -> list:
        return [block.new_cache(batch_size, max_length) for block in self._local(start, end)]

    def _run_blocks(self, hidden: torch.Tensor, start: int, end: int, caches=None, prompts=None) -> torch.Tensor:
        hidden = hidden.to(self.device, self.dtype)
        for i, block in enumerate(self._local(start, end)):
            block_prompts = prompts[i : i + 1].to(self.device, self.dtype) if prompts is not None else None
            hidden = block(hidden, cache=caches[i] if caches is not None else None, prompts=block_prompts)
        return hidden

    def inference_step(self, hidden, caches, *, start: int, end: int, position: int, prompts=None) -> torch.Tensor:
        with torch.inference_mode():
            for cache in caches:
                if cache.length > position:
                    cache.crop(position)  # the client rolled back (retry or replay): forget the tokens after it
            return self._run_blocks(hidden, start, end, caches, prompts if position == 0 else None).cpu()

    def forward(self, hidden, *, start: int, end: int, prompts=None) -> torch.Tensor:
        with torch.inference_mode():
            return self._run_blocks(hidden, start, end, None, prompts).cpu()

    def backward(self, hidden, grad_output, *, start: int, end: int, prompts=None):
        """Recomputes the forward with autograd and returns (grad wrt hidden, grad wrt prompts or None)."""
        with torch.enable_grad():
            hidden = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            inputs = [hidden]
            if prompts is not None:
                prompts = prompts.to(self.device, self.dtype).detach().requires_grad_(True)
                inputs.append(prompts)
            output = self._run_blocks(hidden, start, end, None, prompts)
            grads = torch.autograd.grad(output, inputs, grad_outputs=grad_output.to(output.device, output.dtype))
        return grads[0].cpu(), (grads[1].cpu() if prompts is not None else None)

    def measure(self, *, steps: int = 8, prefill_tokens: int = 64) -> tuple[float, float]:
        """Returns (decode steps/s, forward tokens/s) through the whole span."""
        start, end = self.start, self.end
        hidden_one = torch.randn(1, 1, self.hidden_size) * 0.1
        caches = self.new_caches(start, end, 1, steps + 2)
        self.inference_step(hidden_one, caches, start=start, end=end, position=0)  # warm-up
        began = time.perf_counter()
        for i in range(steps):
            self.inference_step(hidden_one, caches, start=start, end=end, position=i + 1)
        inference_rps = steps / (time.perf_counter() - began)
        hidden_many = torch.randn(1, prefill_tokens, self.hidden_size) * 0.1
        self.forward(hidden_many, start=start, end=end)
        began = time.perf_counter()
        self.forward(hidden_many, start=start, end=end)
        forward_rps = prefill_tokens / (time.perf_counter() - began)
        return inference_rps, forward_rps
