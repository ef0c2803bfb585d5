"""Pre-quantized checkpoints: block weights saved already quantized, in the format transformers + bitsandbytes write
(``save_pretrained`` of a model loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` or
``load_in_8bit=True``), as published ``*-bnb-4bit`` checkpoints are. Detected from config.json's
``quantization_config``; nodes then load the stored codes instead of quantizing float weights (no float checkpoint
on disk, no quantization at load).

Every tensor is checked against the config before use (shape, dtype, bitsandbytes' fixed code books), because a file
is untrusted and bitsandbytes' CUDA kernels read the NF4 code book from a built-in table while the CPU reads the
stored one: a tampered code book would make a CPU verifier disagree with a GPU node.

The stored codes are the weights: a receipt's compute descriptor says ``nf4`` (or ``int8``) as for quantized-at-load
weights, and a verifier that loads the same model id with that quantization reads the same codes. Codes are
dequantized in the span's dtype (as at-load codes are), whatever float dtype the checkpoint was quantized from.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from nectar.models.checkpoint import Checkpoint
from nectar.models.errors import CheckpointError
from nectar.models.quant import NF4_BLOCKSIZE, Int8WeightLinear, _bnb, keep_plain_cpu_layout, quantize_block

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' CUDA and CPU kernels both dequantize
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
MAX_QUANT_STATE_BYTES = 4096  # the packed JSON is ~170 bytes
NF4_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
INT8_SUFFIXES = ("SCB", "weight_format")


def checkpoint_quantization(config) -> str | None:
    """``nf4`` / ``int8`` for a bitsandbytes pre-quantized checkpoint's config, None for a float one; CheckpointError
    for quantizations Nectar cannot serve."""
    spec = getattr(config, "quantization_config", None)
    if spec is None:
        return None
    if not isinstance(spec, dict):
        spec = spec.to_dict() if hasattr(spec, "to_dict") else vars(spec)
    method = spec.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(
            f"the checkpoint is quantized with {method!r}; Nectar serves float checkpoints (quantized at load with "
            "--quant) and bitsandbytes nf4 or int8 ones: use one of those"
        )
    if spec.get("load_in_4bit") or spec.get("_load_in_4bit"):
        if spec.get("bnb_4bit_quant_type") != "nf4":
            raise CheckpointError(
                f"the checkpoint's 4-bit weights are {spec.get('bnb_4bit_quant_type')!r}; Nectar serves nf4 only"
            )
        if spec.get("bnb_4bit_quant_storage", "uint8") != "uint8":
            raise CheckpointError("the checkpoint packs 4-bit weights in a storage dtype other than uint8: re-save it")
        return "nf4"
    if spec.get("load_in_8bit") or spec.get("_load_in_8bit"):
        return "int8"
    raise CheckpointError("the checkpoint's bitsandbytes quantization_config loads neither 4-bit nor 8-bit weights")


class QuantizationMismatchError(CheckpointError):
    """A pre-quantized checkpoint asked for with another quantization: no honest node computes so (a verifier asked
    to recompute such a receipt fails the audit rather than calling it inconclusive)."""


def check_requested(stored: str | None, requested: str, *, model: str) -> None:
    """A pre-quantized checkpoint is served only with its own mode (its float weights are gone; dequantizing to
    serve ``none`` would announce float weights that are not)."""
    if stored is not None and requested != stored:
        raise QuantizationMismatchError(
            f"{model} holds {stored} weights (pre-quantized) but {requested!r} was asked: start the node with "
            f"--quant {stored} (a verifier loads it with quantization {stored!r})"
        )


_maps: dict[str, torch.Tensor] = {}


def _reference_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' NF4 code book and the dynamic map of its nested absmax, as its own quantization writes them."""
    if not _maps:
        _, state = _bnb().functional.quantize_4bit(
            torch.ones(NF4_BLOCKSIZE * 2), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )
        _maps["code"], _maps["nested"] = state.code.float().cpu(), state.state2.code.float().cpu()
    return _maps["code"], _maps["nested"]


def _expect(tensor: torch.Tensor, dtype: torch.dtype, shape: tuple, key: str) -> torch.Tensor:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise CheckpointError(
            f"{key} is {tensor.dtype} {tuple(tensor.shape)}, the config implies {dtype} {shape}: the checkpoint is "
            "corrupt or for another model (re-download or re-save it)"
        )
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"{key} has non-finite values: the checkpoint is corrupt (re-download or re-save it)")
    return tensor


def _quant_state_json(tensor: torch.Tensor, key: str) -> dict:
    if tensor.dtype != torch.uint8 or tensor.ndim != 1 or tensor.numel() > MAX_QUANT_STATE_BYTES:
        raise CheckpointError(f"{key} must be a packed JSON of at most {MAX_QUANT_STATE_BYTES} bytes (uint8, 1-D)")
    try:
        state = json.loads(bytes(tensor.tolist()).decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{key} is not bitsandbytes' packed JSON quant state: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{key} must hold a JSON object")
    return state


def nf4_linear(
    stored: dict[str, torch.Tensor], key: str, *, out_features: int, in_features: int, bias, dtype, device
) -> nn.Module:
    """A ``Linear4bit`` from one layer's stored tensors (``stored``: ``weight`` plus ``weight.<suffix>``)."""
    bnb = _bnb()
    numel = out_features * in_features
    packed = _expect(stored["weight"], torch.uint8, ((numel + 1) // 2, 1), f"{key}.weight")
    state = _quant_state_json(stored["weight.quant_state.bitsandbytes__nf4"], f"{key}.weight.quant_state")
    nested = "weight.nested_absmax" in stored
    allowed = {"quant_type", "blocksize", "dtype", "shape"} | (
        {"nested_blocksize", "nested_dtype", "nested_offset"} if nested else set()
    )
    blocksize = state.get("blocksize")
    if (
        set(state) != allowed
        or state["quant_type"] != "nf4"
        or type(blocksize) is not int
        or blocksize not in BLOCKSIZES
        or state["dtype"] not in FLOAT_DTYPES
        or state["shape"] != [out_features, in_features]
    ):
        raise CheckpointError(
            f"{key}'s quant state {state} is not nf4 of shape [{out_features}, {in_features}] with a blocksize of "
            f"{BLOCKSIZES}: the checkpoint is corrupt or for another model"
        )
    code, nested_code = _reference_maps()
    blocks = math.ceil(numel / blocksize)
    quant_map = _expect(stored["weight.quant_map"], torch.float32, (16,), f"{key}.weight.quant_map")
    if not torch.equal(quant_map, code):
        raise CheckpointError(f"{key}.weight.quant_map is not bitsandbytes' NF4 code book (GPUs ignore a stored one)")
    state2 = offset = None
    if nested:
        nested_blocksize, offset = state["nested_blocksize"], state["nested_offset"]
        if (
            type(nested_blocksize) is not int
            or nested_blocksize not in BLOCKSIZES
            or state["nested_dtype"] != "float32"
            or not isinstance(offset, (int, float))
            or not math.isfinite(offset)
        ):
            raise CheckpointError(f"{key}'s nested quant state {state} is not bitsandbytes' double quantization")
        absmax = _expect(stored["weight.absmax"], torch.uint8, (blocks,), f"{key}.weight.absmax")
        nested_map = _expect(stored["weight.nested_quant_map"], torch.float32, (256,), f"{key}.weight.nested_quant_map")
        if not torch.equal(nested_map, nested_code):
            raise CheckpointError(f"{key}.weight.nested_quant_map is not bitsandbytes' dynamic map")
        nested_absmax = _expect(
            stored["weight.nested_absmax"],
            torch.float32,
            (math.ceil(blocks / nested_blocksize),),
            f"{key}.weight.nested_absmax",
        )
        state2 = bnb.functional.QuantState(
            absmax=nested_absmax, code=nested_map, blocksize=nested_blocksize, dtype=torch.float32
        )
        offset = torch.tensor(float(offset))
    else:
        absmax = _expect(stored["weight.absmax"], torch.float32, (blocks,), f"{key}.weight.absmax")
    quant_state = bnb.functional.QuantState(
        absmax=absmax,
        shape=torch.Size([out_features, in_features]),
        code=quant_map,
        blocksize=blocksize,
        quant_type="nf4",
        dtype=dtype,  # dequantized in the span's dtype, as codes quantized at load are
        offset=offset,
        state2=state2,
    )
    module = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=dtype, quant_type="nf4", device="meta"
    )
    module.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = quant_state
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    keep_plain_cpu_layout(module)
    return module.to(device) if torch.device(device).type != "cpu" else module


def int8_linear(stored: dict[str, torch.Tensor], key: str, *, out_features: int, in_features: int, bias, device):
    """An ``Int8WeightLinear`` from transformers' int8 layout (``weight`` int8 rows, ``SCB`` their absmax)."""
    codes = _expect(stored["weight"], torch.int8, (out_features, in_features), f"{key}.weight")
    scales = _expect(stored["SCB"], torch.float32, (out_features,), f"{key}.SCB")
    layout = stored.get("weight_format")
    if layout is not None and (layout.numel() != 1 or int(layout.reshape(-1)[0]) != 0):
        raise CheckpointError(f"{key}.weight_format is not bitsandbytes' row layout (0): re-save the checkpoint")
    return Int8WeightLinear(codes.to(device), scales.to(device), None if bias is None else bias.to(device))


def load_prequantized_block(
    checkpoint: Checkpoint, block: nn.Module, prefix: str, *, family, mode: str, dtype, device
) -> nn.Module:
    """Fill ``block`` (built on the meta device) from a pre-quantized checkpoint: stored codes for its quantized
    linear layers; float tensors (norms, biases, any layer the checkpoint kept in float, which is quantized here as
    at load) in ``dtype``."""
    from nectar.models.family import ModelFamily

    if type(family).load_block_tensors is not ModelFamily.load_block_tensors:
        raise CheckpointError(
            f"pre-quantized checkpoints of the {family.name} family are not supported (its checkpoints store block "
            "tensors under other names): serve its float checkpoint with --quant nf4 or int8"
        )
    names = list(block.state_dict())
    linears = {name: module for name, module in block.named_modules() if type(module) is nn.Linear}
    quantized = {name for name in linears if _is_stored_quantized(checkpoint, prefix + name, mode)}
    suffixes = NF4_SUFFIXES if mode == "nf4" else INT8_SUFFIXES
    float_names = [n for n in names if n.rsplit(".", 1)[0] not in quantized or n.endswith(".bias")]
    tensors = family.load_block_tensors(checkpoint, prefix, float_names, dtype=dtype, device="cpu")
    block.load_state_dict(tensors, strict=False, assign=True)
    for name in quantized:
        linear = linears[name]
        key = prefix + name
        wanted = [f"{key}.weight"] + [
            f"{key}.weight.{s}" if mode == "nf4" else f"{key}.{s}" for s in suffixes if _has(checkpoint, key, s, mode)
        ]
        raw = checkpoint.load(wanted)
        stored = {k.removeprefix(key + "."): v for k, v in raw.items()}
        bias = tensors.get(f"{name}.bias")
        if mode == "nf4":
            needed = ("absmax", "quant_map", "quant_state.bitsandbytes__nf4")
            if "weight.nested_absmax" in stored:
                needed += ("nested_quant_map",)
            missing = [s for s in needed if f"weight.{s}" not in stored]
            if missing:
                raise CheckpointError(f"{checkpoint.path} lacks {[f'{key}.weight.{s}' for s in missing]}")
            new = nf4_linear(
                stored,
                key,
                out_features=linear.out_features,
                in_features=linear.in_features,
                bias=bias,
                dtype=dtype,
                device=device,
            )
        else:
            if "SCB" not in stored:
                raise CheckpointError(f"{checkpoint.path} lacks {key}.SCB (the int8 rows' scales)")
            new = int8_linear(
                stored, key, out_features=linear.out_features, in_features=linear.in_features, bias=bias, device=device
            )
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, new.eval().requires_grad_(False))
    # everything still float (norms, layers the checkpoint kept in float) moves now; float layers quantize as at load
    for module in block.modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                raise CheckpointError(f"{checkpoint.path} lacks a tensor of block {prefix}: {param_name}")
    return quantize_block(_move_float(block, dtype, device), mode, dtype)


def _is_stored_quantized(checkpoint: Checkpoint, key: str, mode: str) -> bool:
    return f"{key}.weight.quant_state.bitsandbytes__nf4" in checkpoint if mode == "nf4" else f"{key}.SCB" in checkpoint


def _has(checkpoint: Checkpoint, key: str, suffix: str, mode: str) -> bool:
    return (f"{key}.weight.{suffix}" if mode == "nf4" else f"{key}.{suffix}") in checkpoint


def _move_float(block: nn.Module, dtype, device) -> nn.Module:
    """Moves the block's float parameters and buffers (not the quantized layers' codes and scales) to ``device`` in
    ``dtype``."""
    for module in block.modules():
        if isinstance(module, Int8WeightLinear) or type(module).__name__ == "Linear4bit":
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.to(device=device, dtype=dtype), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            cast = buffer.to(device=device, dtype=dtype) if buffer.is_floating_point() else buffer.to(device)
            module.register_buffer(name, cast)
    return block


__all__ = [
    "QuantizationMismatchError",
    "checkpoint_quantization",
    "check_requested",
    "load_prequantized_block",
    "nf4_linear",
    "int8_linear",
]
