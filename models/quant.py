"""Weight quantization of a span's blocks (``load_span(..., quantization=...)``), through bitsandbytes.

Each mode is one exact recipe, the same on every device, so a verifier on another machine recomputes a node's
outputs from the same quantized weights (audits compare within the dtype's tolerance: only reduction order differs):

- ``int8``: weight-only int8, bitsandbytes' Int8Params format (``int8_vectorwise_quant``: each output row scaled by
  its absmax to [-127, 127]) and its weight-only product (``MatMul8bitFp``: dequantize, then the dtype's matmul).
  Activations stay in the span's dtype: no LLM.int8 outlier threshold whose int8 activations a CPU could not
  reproduce cheaply.
- ``nf4``: bitsandbytes ``Linear4bit`` (QLoRA's NormalFloat4, blocks of 64, double-quantized absmax), computed in the
  span's dtype; bitsandbytes' CUDA and CPU backends dequantize the same codes.

Quantization always runs on the CPU (then the codes move to the device), so ties round the same on every machine.
Every ``nn.Linear`` of a block is replaced; its norms keep the span's dtype. Checkpoints saved already quantized
(``nectar.models.prequant``) load their stored codes into the same modules.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("none", "int8", "nf4")
NF4_BLOCKSIZE = 64
logger = logging.getLogger(__name__)


def check_quantization(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown weight quantization {mode!r}: use one of {', '.join(QUANT_MODES)}")
    return mode


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - installed by scripts/setup.sh
        raise ImportError(
            "quantized weights need bitsandbytes: pip install 'bitsandbytes>=0.49' (or run scripts/setup.sh)"
        ) from e
    return bitsandbytes


_local = threading.local()


def _scratch(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """This thread's CPU buffer for one dequantized weight matrix (grown to the largest layer it has run)."""
    numel = shape[0] * shape[1]
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):
            buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


class Int8WeightLinear(nn.Module):
    """``y = x @ (CB * SCB / 127)^T + bias`` in x's dtype: bitsandbytes' weight-only int8 product (MatMul8bitFp),
    CB the int8 rows, SCB their absmax (float32)."""

    def __init__(self, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = CB.shape[1], CB.shape[0]
        self.register_buffer("CB", CB)
        self.register_buffer("SCB", SCB)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        weight = linear.weight.detach()
        # as Int8Params quantizes (from float16), on the CPU: the same codes on every machine
        CB, SCB, _ = _bnb().functional.int8_vectorwise_quant(weight.to("cpu", torch.float16))
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(CB.to(weight.device), SCB.float().to(weight.device), bias)

    def _apply(self, fn, recurse=True):
        # a dtype cast of the module must not round the scales (they belong to the codes, not to the compute dtype)
        scales = self.SCB
        result = super()._apply(fn, recurse)
        self.SCB = scales.to(self.CB.device)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.SCB.unsqueeze(1).mul(1.0 / 127.0)
        if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            # a fresh dequantized matrix is a fresh large allocation, page-faulted in on every call (15x a float32
            # matmul for a 7B-shaped layer on CPU); the thread's scratch is reused. Not under autograd: backward
            # would read a scratch that later layers overwrote.
            weight = _scratch(self.CB.shape, x.dtype).copy_(self.CB).mul_(scales)
        else:
            weight = self.CB.to(x.dtype).mul_(scales)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def _nf4_linear(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    weight = linear.weight.detach()
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        quant_type="nf4",
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        weight.to("cpu", dtype).contiguous(),
        requires_grad=False,
        quant_type="nf4",
        blocksize=NF4_BLOCKSIZE,
        module=module,
    )._quantize("cpu")
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().to("cpu", dtype), requires_grad=False)
    keep_plain_cpu_layout(module)
    return module.to(weight.device) if weight.device.type != "cpu" else module


def keep_plain_cpu_layout(module: nn.Module) -> nn.Module:
    """On AVX512-BF16 CPUs bitsandbytes repacks a ``Linear4bit``'s codes on its first forward, which fails for layers
    whose input size is not a multiple of 64 or output size of 32 (e.g. an intermediate size of 1376: "shape
    [512, 21] is invalid"). Such layers keep the plain layout, which every CPU computes."""
    if module.in_features % 64 or module.out_features % 32:
        module.support_avx512bf16_for_cpu = False
    return module


FUSED_ROWS = 4  # rows bitsandbytes' fused 4-bit product always takes (no float copy of the matrix)


def _bnb_fuses(x: torch.Tensor, rows: int, out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' own product of ``rows`` rows runs its fused 4-bit kernel (no float copy of the matrix)
    rather than dequantizing into a fresh copy, then ``F.linear``, as its CUDA dispatch chooses per GPU and shape
    (0.50: fused up to 16-64 rows for the wide matrices on an H100). False where this bitsandbytes does not say: its
    older versions always dequantize past one row."""
    try:
        from bitsandbytes.backends.cuda import ops

        if rows > ops._gemm_4bit_custom_max_m or in_features % blocksize:
            return False
        return bool(ops._gemm_4bit_use_custom_fn(x.device.index, x.dtype, rows, out_features, in_features))
    except Exception:  # another version's private names: the scratch, as for older versions
        return False


class NF4Scratch:
    """One float copy of a span's largest nf4 matrix (and its absmax) on the GPU, which every layer's products that
    bitsandbytes computes by dequantizing (past ``FUSED_ROWS`` rows) dequantize into in turn. bitsandbytes allocates
    that copy afresh for each product, so a recorded round's private memory pool would keep one per recording (a 70B
    MLP matrix: 470 MB each); this one is allocated once, outside every pool. A span's products run one at a time on
    its compute thread, on one stream."""

    def __init__(self, linears: list[nn.Module], dtype: torch.dtype, device: torch.device):
        weights = max(m.out_features * m.in_features for m in linears)
        blocks = max(m.weight.quant_state.absmax.numel() for m in linears)
        self.weight = torch.empty(weights, dtype=dtype, device=device)
        self.absmax = torch.empty(blocks, dtype=torch.float32, device=device)


class NF4Rows:
    """``linear(x)`` for an nf4 ``Linear4bit`` on a GPU: exactly bitsandbytes' products, with the kernel it chooses
    (its fused kernel up to ``FUSED_ROWS`` rows, and beyond where its dispatch says so; else its
    dequantize-then-``F.linear`` fallback), the float copy of the matrix in a shared ``NF4Scratch`` instead of a fresh
    allocation, so rounds of several sessions can be recorded as CUDA graphs."""

    def __init__(self, linear: nn.Module, scratch: NF4Scratch):
        state = linear.weight.quant_state
        self.linear, self.scratch, self.state = linear, scratch, state
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.offset = state.offset.to(scratch.absmax.device) if state.nested else None
        self.error: str | None = None  # why the scratch was given up for this layer
        self._fuses: dict[int, bool] = {}  # rows -> bitsandbytes' own product needs no float copy
        self.through_scratch = 0  # products computed through the scratch (a recorded round counts once)
        self.kernel = _nf4_kernel(linear) if scratch.weight.is_cuda else None  # ``nf4_kernel``: "triton"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            self.kernel is not None
            and rows <= self.kernel.max_rows
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and not torch.is_grad_enabled()
        ):
            try:
                return self.kernel(x)
            except Exception as error:  # a GPU Triton cannot build for: bitsandbytes' products from now on
                if torch.cuda.is_current_stream_capturing():
                    raise
                _warn_once(
                    "failed",
                    f"The nf4 Triton kernel failed ({type(error).__name__}: {str(error)[:200]}); "
                    "computing nf4 products with bitsandbytes",
                )
                self.kernel = None
        if rows <= FUSED_ROWS or torch.is_grad_enabled() or x.dtype != self.scratch.weight.dtype or self.error:
            return self.linear(x)
        if x.is_cuda:
            fuses = self._fuses.get(rows)
            if fuses is None:
                fuses = self._fuses[rows] = _bnb_fuses(
                    x, rows, self.out_features, self.in_features, self.state.blocksize
                )
            if fuses:
                return self.linear(x)
        try:
            return self._through_scratch(x)
        except (RuntimeError, ValueError) as error:  # a bitsandbytes whose ops take other arguments: its own path
            if x.is_cuda and torch.cuda.is_current_stream_capturing():  # not inside a recording: its error
                raise
            self.error = f"{type(error).__name__}: {str(error)[:200]}"
            logger.warning(f"nf4 products through the shared scratch failed ({self.error}); using bitsandbytes' own")
            return self.linear(x)

    def _through_scratch(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        absmax = state.absmax
        if state.nested:
            absmax = self.scratch.absmax[: absmax.numel()]
            _bnb().functional.dequantize_blockwise(state.absmax, state.state2, out=absmax)
            absmax.add_(self.offset)
        weight = self.scratch.weight[: self.out_features * self.in_features].view(state.shape)
        torch.ops.bitsandbytes.dequantize_4bit.out(
            self.linear.weight.data, absmax, state.blocksize, state.quant_type, state.shape, x.dtype, out=weight
        )
        bias = None if self.linear.bias is None else self.linear.bias.to(x.dtype)
        self.through_scratch += 1
        return F.linear(x, weight, bias)


_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    """One warning of each kind per process: a span's hundreds of nf4 layers would each say the same."""
    if kind not in _warned:
        _warned.add(kind)
        logger.warning(message)


def _nf4_kernel(linear: nn.Module):
    """The Triton product for this layer where ``nf4_kernel`` asks for it and Triton imports, else None. A bad
    ``nf4_tiles`` raises (the node does not start), naming what to give."""
    from nectar.settings import current

    if current().nf4_kernel != "triton":
        return None
    try:
        from nectar.models import nf4_triton
    except ImportError as error:
        _warn_once("import", f"nf4 products through bitsandbytes: Triton does not import here ({error})")
        return None
    tiles = nf4_triton.configured_tiles()
    try:
        return nf4_triton.NF4Kernel(linear, **tiles)
    except ValueError as error:  # codes it does not take
        _warn_once("layout", f"some nf4 products through bitsandbytes: the Triton kernel does not take them ({error})")
        return None


def nf4_on_gpu(linear: nn.Module) -> bool:
    """An nf4 ``Linear4bit`` on a GPU that ``NF4Rows`` can compute (blocks along whole rows)."""
    state = getattr(getattr(linear, "weight", None), "quant_state", None)
    return (
        state is not None
        and linear.weight.device.type == "cuda"
        and state.quant_type == "nf4"
        and (not state.nested or state.state2.blocksize == 256)
        and linear.compute_dtype in (torch.float16, torch.bfloat16)
    )


def quantize_block(block: nn.Module, mode: str, dtype: torch.dtype) -> nn.Module:
    """Replace every ``nn.Linear`` of ``block`` with its ``mode`` version (in place; returns ``block``)."""
    if check_quantization(mode) == "none":
        return block
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = Int8WeightLinear.from_linear(child) if mode == "int8" else _nf4_linear(child, dtype)
                setattr(parent, name, new.eval().requires_grad_(False))
    return block


def module_bytes(module: nn.Module) -> int:
    """Bytes a module holds on its device: parameters, buffers and bitsandbytes' 4-bit quantization state."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(t.numel() * t.element_size() for t in module.buffers())
    for sub in module.modules():
        state = getattr(getattr(sub, "weight", None), "quant_state", None)
        if state is not None:
            total += sum(
                v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if torch.is_tensor(v)
            )
    return total


__all__ = [
    "QUANT_MODES",
    "check_quantization",
    "Int8WeightLinear",
    "keep_plain_cpu_layout",
    "quantize_block",
    "FUSED_ROWS",
    "NF4Rows",
    "NF4Scratch",
    "nf4_on_gpu",
    "module_bytes",
]
