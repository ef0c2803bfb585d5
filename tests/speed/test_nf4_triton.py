"""nf4 products of a few rows in one Triton kernel (``nf4_triton``), on a CPU through Triton's interpreter.

What a GPU runs, less the compiler: each weight dequantized to the bit as bitsandbytes dequantizes it (plain and
double-quantized absmax), products summed in float32, and an nf4 node's decode rounds of several sessions recorded
(here run eagerly) equal to the same rounds through bitsandbytes. The interpreter must be on before Triton is first
imported, so each check runs in a fresh interpreter (this file, run as a script); tests/speed/test_nf4_cuda.py
checks the compiled kernel on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nectar.settings import env_name

pytest.importorskip("triton")  # not imported here: in this process the interpreter would be off
pytest.importorskip("bitsandbytes")

ROUTE_ENV = env_name("decode_route")


def _check(name: str, *args: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", ROUTE_ENV: "triton"}
    done = subprocess.run([sys.executable, __file__, name, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name} {args} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    assert f"{name} ok" in done.stdout


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_kernel_dequantizes_as_bitsandbytes_and_sums_in_float32(dtype):
    _check("products", dtype)


def test_an_nf4_nodes_rounds_of_several_sessions_are_recorded_and_equal_bitsandbytes(tiny_llama):
    _check("rounds", "float16", tiny_llama)


def check_products(dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    from nectar.models import nf4_triton
    from nectar.models.quant import _nf4_linear, few_row_product

    generator = torch.Generator().manual_seed(0)
    for in_features, out_features, rows, bias, nested in [
        (256, 96, 1, False, True),
        (512, 80, 5, True, True),
        (192, 48, 16, False, True),
        (320, 64, 3, False, False),
    ]:
        linear = torch.nn.Linear(in_features, out_features, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.05)
        layer = _nf4_linear(linear, dtype)
        if not nested:  # as a checkpoint saved without double quantization loads
            state = layer.weight.quant_state
            state.absmax, state.nested, state.state2, state.offset = (
                bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset,
                False,
                None,
                None,
            )
        product = few_row_product(layer)
        assert isinstance(product, nf4_triton.NF4Product) and product.nested == nested
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        x = (torch.randn(rows, in_features, generator=generator)).to(dtype)
        with torch.inference_mode():
            out = product(x)
        expected = F.linear(x.float(), weight.float(), None if layer.bias is None else layer.bias.float())
        exact = expected.to(dtype)
        # float32 sums in another order: the last rounding may go the other way, by one unit, rarely
        differ = out != exact
        assert differ.float().mean().item() <= 0.02, (in_features, rows, differ.float().mean().item())
        ulp = torch.finfo(dtype).eps * expected.abs()
        assert ((out.float() - expected).abs() <= ulp + 1e-30).all()
    # more rows than one launch computes: the layer itself
    calls = []
    layer.forward = lambda x: calls.append(x.shape) or torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype)
    with torch.inference_mode():
        product(torch.zeros(nf4_triton.MAX_ROWS + 1, layer.in_features, dtype=dtype))
    assert calls == [(nf4_triton.MAX_ROWS + 1, layer.in_features)]


def check_rounds(dtype: torch.dtype, tiny_llama: str) -> None:
    from nectar.models import nf4_triton
    from nectar.node.backend import SpanBackend
    from nectar.node.graphs import GraphedDecoder

    routes = {}
    for route in ("triton", "eager"):
        os.environ[ROUTE_ENV] = route
        backend = SpanBackend(
            tiny_llama, 0, 4, dtype=dtype, device="cpu", quantization="nf4", show_progress=False, batching=True
        )
        runner = backend.batch_runner
        assert all(layer.few_rows for layer in runner.layers) == (route == "triton")
        backend.decode_graphs = GraphedDecoder(runner, capture=False)
        routes[route] = backend
    assert routes["triton"].decode_graphs.max_sessions == nf4_triton.MAX_ROWS
    assert routes["eager"].decode_graphs.max_sessions == 1  # bitsandbytes' one-row kernel only
    generator = torch.Generator().manual_seed(0)
    hidden = routes["eager"].hidden_size
    sessions = []
    for prefill in (3, 5, 8, 13):
        x = torch.randn(1, prefill, hidden, generator=generator)
        caches = {}
        for route, backend in routes.items():
            caches[route] = backend.new_caches(0, 4, 1, 40)
            backend.inference_step(x, caches[route], start=0, end=4, position=0)
        sessions.append([caches, prefill])
    worst = 0.0
    for _ in range(3):
        for group in (sessions, sessions[1:2]):  # a round of four sessions, then one alone
            xs = [torch.randn(1, 1, hidden, generator=generator) for _ in group]
            outputs = {}
            for route, backend in routes.items():
                tasks = [
                    backend.inference_task(x, caches[route], start=0, end=4, position=position)
                    for x, (caches, position) in zip(xs, group)
                ]
                outputs[route] = backend.run_inference(tasks)
            for mine, theirs in zip(outputs["triton"], outputs["eager"]):
                worst = max(worst, (mine.float() - theirs.float()).abs().max().item())
            for session in group:
                session[1] += 1
    # every round went through the recorded-round path, the rounds of four too
    assert routes["triton"].decode_graphs.replays == 6, routes["triton"].decode_graphs.replays
    # the same dequantized weights; only the order of float32 sums differs, a few units in the last place
    assert worst <= 64 * torch.finfo(dtype).eps, worst


if __name__ == "__main__":
    check, dtype_name, *rest = sys.argv[1:]
    {"products": check_products, "rounds": check_rounds}[check](getattr(torch, dtype_name), *rest)
    print(f"{check} ok")
