"""The nf4 product kernel (``nectar.models.nf4_triton``): the weights it multiplies are bitsandbytes' dequantized
weights bit for bit, and its products equal theirs multiplied in float32 up to the order of the float32 sums.

On a CPU, Triton's interpreter runs the kernel's own code (a fresh interpreter per check: it must be on before Triton
is imported); on a GPU, the compiled kernel, eagerly and replayed in a CUDA graph.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")  # not imported here: in this process the interpreter would be off
pytest.importorskip("bitsandbytes")

# (in_features, out_features, rows): one row and several; K split across programs (1344 = 21 groups of 64);
# output features that no tile divides
CASES = [(256, 96, 1), (384, 40, 3), (128, 64, 16), (1344, 33, 1), (1344, 48, 5), (512, 130, 2)]


def _layer(in_features: int, out_features: int, dtype: torch.dtype, *, nested: bool, bias: bool, device="cpu"):
    import bitsandbytes as bnb

    from nectar.models.quant import keep_plain_cpu_layout

    generator = torch.Generator().manual_seed(in_features * 1000 + out_features)
    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=dtype,
        quant_type="nf4",
        compress_statistics=nested,
        device="meta",
    )
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(dtype)
    module.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=nested, module=module
    )._quantize(device)
    if bias:
        module.bias = torch.nn.Parameter((torch.randn(out_features, generator=generator) * 0.1).to(dtype, copy=True))
    keep_plain_cpu_layout(module)
    return module.to(device)


def check_products(dtype: torch.dtype, device: str = "cpu") -> None:
    """Products against bitsandbytes' dequantized weights in float32, and one-hot rows read those weights exactly."""
    import bitsandbytes.functional as bf

    from nectar.models.nf4_triton import NF4Kernel

    generator = torch.Generator().manual_seed(0)
    for nested in (True, False):
        for in_features, out_features, rows in CASES:
            layer = _layer(in_features, out_features, dtype, nested=nested, bias=rows % 2 == 1, device=device)
            weight = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
            # K split across programs, or not; x's pairs in one load or two; codes to values by gather or selects
            for programs, paired, select in ((1, False, False), (8, True, True), (264, False, True)):
                tiles = {
                    "one_row": (16, 128, 4, paired, select, programs),
                    "several_rows": (64, 64, 4, False, select, programs),
                }
                kernel = NF4Kernel(layer, **tiles)
                x = torch.randn(rows, in_features, generator=generator).to(device, dtype)
                y = kernel(x)
                expected = x.float() @ weight.float().t()
                if layer.bias is not None:
                    expected += layer.bias.float()
                assert y.dtype == dtype and y.shape == (rows, out_features)
                # one rounding of the float32 sum to dtype, plus float32 sums in another order
                tolerance = expected.abs() * torch.finfo(dtype).eps + 1e-5 * in_features**0.5
                assert ((y.float() - expected).abs() <= tolerance).all(), (nested, in_features, out_features, rows)
                columns = torch.randint(0, in_features, (rows,), generator=generator)
                one_hot = torch.zeros(rows, in_features, dtype=dtype, device=device)
                one_hot[torch.arange(rows), columns] = 1
                exact = NF4Kernel(layer, **tiles)
                exact.bias = None
                assert torch.equal(exact(one_hot), weight[:, columns].t()), (nested, in_features, rows, programs)


def test_the_tiles_setting_replaces_the_built_in_tiles_and_bad_json_says_what_to_give():
    from nectar.models import nf4_triton
    from nectar.settings import configured

    with configured(nf4_tiles='{"one_row": [32, 256, 8, true, true, 132]}'):
        tiles = nf4_triton.configured_tiles()
    assert tiles == {"one_row": (32, 256, 8, True, True, 132), "several_rows": nf4_triton.SEVERAL_ROWS}
    for bad in ('{"one_row": [32, 256]}', "one_row=32"):
        with configured(nf4_tiles=bad), pytest.raises(ValueError, match="NECTAR_NF4_TILES is not valid.*give JSON"):
            nf4_triton.configured_tiles()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_kernel_multiplies_bitsandbytes_weights_on_the_interpreter(dtype):
    from tests.speed.utils import run_interpreted  # here, not at the top: this file also runs as a script

    run_interpreted(__file__, dtype, expect="products ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA GPU (the device machine)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_compiled_kernel_multiplies_bitsandbytes_weights_and_records(dtype):
    check_products(dtype, "cuda")
    from nectar.models.nf4_triton import NF4Kernel

    generator = torch.Generator().manual_seed(3)
    for in_features, out_features in [(4096, 11008), (11008, 4096), (8192, 1024)]:
        layer = _layer(in_features, out_features, dtype, nested=True, bias=False, device="cuda")
        kernel = NF4Kernel(layer)
        for rows in (1, 4, 16):
            x = torch.randn(rows, in_features, generator=generator).to("cuda", dtype)
            with torch.inference_mode():
                eager = kernel(x)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    kernel(x)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    recorded = kernel(x)
                graph.replay()
                torch.cuda.synchronize()
            assert torch.equal(recorded, eager), (in_features, out_features, rows)
            theirs = layer(x).float()  # bitsandbytes' own product: another order of sums, its own roundings
            assert (eager.float() - theirs).abs().max().item() <= 8 * torch.finfo(dtype).eps * theirs.abs().max()


if __name__ == "__main__":
    check_products(getattr(torch, sys.argv[1]))
    print("products ok")
