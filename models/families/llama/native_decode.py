"""One session's decode step through a CPU node's Llama blocks in C (``nectar/models/native/kernels.c``).

A single new token makes each block about 25 small PyTorch ops (norms, RoPE, the cache write, SDPA, SiLU, residuals)
around its four products. Between steps, the blocks' weights stream through the caches and evict the code and data
of those ops, so each costs several microseconds more than it does warm: on a 2-core AMD EPYC VM they took 1.0 ms of
a 3.3 ms step through 4 "tiny" blocks (SDPA alone 90 us per block). The C layer does the whole block in one call.
It computes the same operations in float32 in the same order of steps; sums may associate differently (as between
BLAS libraries), so outputs agree with the PyTorch path to float32 rounding.

At load, the node times both routes on a few steps of a scratch session and keeps the C layer only where it was
faster (on CPUs or thread counts where a BLAS wins, the PyTorch path stays). ``NECTAR_NATIVE_DECODE=on`` skips the
timing, ``=off`` keeps PyTorch; ``NECTAR_NATIVE=off`` turns every C kernel off.
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nectar.models.cache import SpanCache
from nectar.models.cpu_blas import native_kernel
from nectar.models.families.llama.fused import FusedLayer, FusedLlamaBlocks
from nectar.models.fast_path import SpanStep
from nectar.settings import current

logger = logging.getLogger(__name__)

MIN_GAIN = 1.03  # the C layer must be this much faster than the PyTorch path, both timed at load
TIMED_STEPS = 16  # per route, alternating; the first two of each warm up


def _address(tensor: torch.Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


class NativeDecoder:
    """Runs single-token, single-sequence steps of a ``LlamaBatchRunner``'s layers through the C layer.

    :param runner: the blocks; its ``run`` is the PyTorch path the C layer is timed against
    """

    def __init__(self, runner: FusedLlamaBlocks, kernel: ctypes.CDLL):
        self.runner = runner
        self.decode = kernel.nectar_llama_decode_f32
        self.layers = [self._layer_arguments(layer) for layer in runner.layers]
        self.intermediate = runner.layers[0].down_weight.shape[0]

    @classmethod
    def build(cls, runner: FusedLlamaBlocks) -> NativeDecoder | None:
        """A decoder where the blocks qualify and it measured faster than the PyTorch path (see the module), else
        None. ``runner`` must be usable without it (its ``native`` is None meanwhile)."""
        choice = current().native_decode  # auto, on or off (checked by the settings)
        first = runner.spans[0]
        if choice == "off" or first.device.type != "cpu" or first.dtype != torch.float32 or runner.cos_table is None:
            return None
        if runner.num_heads % runner.num_kv_heads or len(runner.cos_table) <= TIMED_STEPS:
            return None
        if not all(
            not layer.quantized  # the C layer reads float32 matrices
            and layer.act is F.silu
            and layer.q_norm is None  # the C layer has no per-head norms
            and layer.input_norm.fused
            and layer.post_norm.fused
            and layer.input_norm.eps == layer.post_norm.eps
            for layer in runner.layers
        ):
            return None
        kernel = native_kernel()
        if kernel is None:
            return None
        decoder = cls(runner, kernel)
        if choice == "on":
            return decoder
        native_s, pytorch_s = decoder.time_against_pytorch()
        chosen = pytorch_s / native_s >= MIN_GAIN
        logger.info(
            f"One session's decode step through {len(runner.layers)} blocks: C layer {native_s * 1e3:.2f} ms, "
            f"PyTorch {pytorch_s * 1e3:.2f} ms ({pytorch_s / native_s:.2f}x): "
            f"{'C layer' if chosen else 'PyTorch'} chosen"
        )
        return decoder if chosen else None

    @torch.inference_mode()
    def time_against_pytorch(self) -> tuple[float, float]:
        """Median seconds of one decode step through every layer, (C layer, PyTorch path), steps alternating."""
        runner = self.runner
        hidden_size = runner.spans[0].hidden_size
        seconds = {"native": [], "pytorch": []}
        caches = {route: [span.new_cache(1, TIMED_STEPS) for span in runner.spans] for route in seconds}
        generator = torch.Generator().manual_seed(0)
        for position in range(TIMED_STEPS):
            hidden = torch.randn(1, 1, hidden_size, generator=generator)
            for route, times in seconds.items():
                task = SpanStep(hidden, caches[route], 0, len(runner.layers), position)
                began = time.perf_counter()
                if route == "native":
                    self.run(task, 0)
                else:
                    runner.run([task], 0)
                times.append(time.perf_counter() - began)
        return statistics.median(seconds["native"][2:]), statistics.median(seconds["pytorch"][2:])

    @staticmethod
    def _layer_arguments(layer: FusedLayer) -> tuple:
        return (
            _address(layer.input_norm.weight),
            _address(layer.post_norm.weight),
            layer.input_norm.eps,
            _address(layer.qkv_weight),
            _address(layer.qkv_bias),
            _address(layer.o_weight),
            _address(layer.o_bias),
            _address(layer.gate_up_weight),
            _address(layer.gate_up_bias),
            _address(layer.down_weight),
            _address(layer.down_bias),
        )

    def applies(self, tasks: Sequence[SpanStep]) -> bool:
        """One session's one new token, at a position the RoPE tables hold, with contiguous float32 caches."""
        if len(tasks) != 1:
            return False
        task = tasks[0]
        if task.hidden.shape[:2] != (1, 1) or task.hidden.dtype != torch.float32 or task.prompts is not None:
            return False
        table = self.runner.cos_table
        if table is None or task.caches[0].length >= len(table):
            return False
        return all(
            isinstance(cache, SpanCache)  # not a PagedCache: the C layer reads one contiguous buffer
            and cache.buffer.dtype == torch.float32
            and cache.buffer.is_contiguous()
            and cache.buffer.shape[2] == 1
            for cache in task.caches
        )

    def run(self, task: SpanStep, first_block: int) -> torch.Tensor:
        """[1, 1, hidden] output of the task's blocks; appends the token to each block's cache."""
        runner = self.runner
        hidden_size = task.hidden.shape[-1]
        x = task.hidden.reshape(hidden_size).to(torch.float32, copy=True)  # the step's input stays as it was
        length = task.caches[0].length
        cos, signed_sin = runner.cos_table[length], runner.signed_sin_table[length]
        dim, heads, kv_heads = runner.head_dim, runner.num_heads, runner.num_kv_heads
        scratch = torch.empty((2 * heads + 2 * kv_heads + 1) * dim + hidden_size + 2 * self.intermediate + length + 1)
        for local in range(task.end - task.start):
            (input_norm, post_norm, eps, qkv, qkv_bias, o, o_bias, gate_up, gate_up_bias, down, down_bias) = (
                self.layers[first_block + local]
            )
            buffer = task.caches[local].buffer  # [1 block, key/value, 1 sequence, kv_heads, max_length, dim]
            keys, values = buffer[0, 0, 0], buffer[0, 1, 0]
            self.decode(
                x.data_ptr(),
                hidden_size,
                input_norm,
                post_norm,
                eps,
                qkv,
                qkv_bias,
                heads,
                kv_heads,
                dim,
                o,
                o_bias,
                gate_up,
                gate_up_bias,
                self.intermediate,
                down,
                down_bias,
                cos.data_ptr(),
                signed_sin.data_ptr(),
                keys.data_ptr(),
                values.data_ptr(),
                keys.stride(0),
                keys.stride(1),
                length,
                runner.scaling,
                scratch.data_ptr(),
            )
        for cache in task.caches:
            cache.length = length + 1
        return x.view(1, 1, hidden_size)
