"""The Triton decode route (``triton_decode``) through the node's recorded-round path, on a CPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels' own code on CPU tensors, so what is checked here is
what a GPU runs, less the compiler: each kernel rounds as the eager route does (bit for bit in float16 and bfloat16,
attention to float32 accuracy), and whole decode rounds, one session's and a pooled round of several, equal the
eager route's. The interpreter must be on before Triton is first imported, so each check runs in a fresh
interpreter (this file, run as a script). On a GPU, the compiled kernels' recorded rounds are checked against the
eager route's (the GPU test below; benchmarks/gpu/decode_profile.py profiles both).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from nectar.models.families.llama.fused import rope_in_place
from nectar.settings import env_name

pytest.importorskip("triton")  # not imported here: in this process the interpreter would be off

ROUTE_ENV = env_name("decode_route")


def _check(name: str, *args: str) -> None:
    from tests.speed.utils import run_interpreted  # here, not at the top: this file also runs as a script

    run_interpreted(__file__, name, *args, expect=f"{name} ok")


def _decode_round(backends: dict, group: list, generator: torch.Generator) -> dict:
    """One decode step of each session in ``group`` ([caches by backend name, position]) on every backend, the
    same random input for each: the outputs by backend name; the sessions' positions advance."""
    hidden = next(iter(backends.values())).hidden_size
    xs = [torch.randn(1, 1, hidden, generator=generator) for _ in group]
    outputs = {}
    for name, backend in backends.items():
        tasks = [
            backend.inference_task(x, caches[name], start=0, end=4, position=position)
            for x, (caches, position) in zip(xs, group)
        ]
        outputs[name] = backend.run_inference(tasks)
    for session in group:
        session[1] += 1
    return outputs


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_each_kernel_rounds_as_the_eager_route(dtype):
    _check("kernels", dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_nf4_rounds_through_the_kernels_equal_the_eager_route(tiny_llama, dtype):
    pytest.importorskip("bitsandbytes")
    _check("nf4", dtype, str(tiny_llama))


def test_a_gpu_triton_cannot_build_for_falls_back_to_pytorch_kernels(tiny_llama):
    _check("fallback", "float16", str(tiny_llama))


@pytest.mark.parametrize("dtype,lone_length", [("float16", 40), ("bfloat16", 40), ("float16", 24)])
def test_recorded_rounds_through_the_kernels_equal_the_eager_route(tiny_llama, dtype, lone_length):
    """Rounds of five sessions and of subsets of them through ``GraphedDecoder`` (run eagerly on the CPU) against the
    same rounds through the eager route, same caches and inputs: over pooled caches (equal lengths), and over each
    session's own buffer (one session's cache shorter)."""
    _check("rounds", dtype, str(tiny_llama), str(lone_length))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_paged_rounds_through_the_kernels_equal_rounds_over_own_caches(tiny_llama, dtype):
    """Sessions in a page pool (pages of 4 tokens: they cross pages, and rows of no session fill the round's
    bucket) through ``PagedDecoder``, against the same sessions over their own caches on the same route: the same
    kernels, addressed through page tables, give the same bits (the eager paged route only within rounding)."""
    _check("paged", dtype, str(tiny_llama))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA GPU (the device machine)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_lengths", [(40, 24, 300), (300, 300, 300)], ids=["own-caches", "pooled-caches"])
def test_recorded_rounds_on_the_gpu_equal_the_eager_route(tiny_llama, monkeypatch, dtype, max_lengths):
    """The compiled kernels in recorded rounds (CUDA graphs), against the eager route's recorded rounds: caches of
    300 positions take two attention chunks and their combination."""
    from nectar.node.backend import SpanBackend

    backends = {}
    for route in ("triton", "eager"):
        monkeypatch.setenv(ROUTE_ENV, route)
        backend = SpanBackend(tiny_llama, 0, 4, dtype=dtype, device="cuda", show_progress=False, batching=True)
        assert backend.decode_graphs is not None and backend.decode_graphs.capture
        backends[route] = backend
    assert backends["triton"].batch_runner.fused and not backends["eager"].batch_runner.fused
    generator = torch.Generator().manual_seed(0)
    hidden = backends["eager"].hidden_size
    sessions = []
    for max_length, prefill in zip(max_lengths, (5, 3, 7)):
        x = torch.randn(1, prefill, hidden, generator=generator)
        caches = {route: backend.new_caches(0, 4, 1, max_length) for route, backend in backends.items()}
        for route, backend in backends.items():
            backend.inference_step(x, caches[route], start=0, end=4, position=0)
        sessions.append([caches, prefill])
    worst = 0.0
    for step in range(12):
        for group in (sessions, sessions[:1]):
            outputs = _decode_round(backends, group, generator)
            for fused, eager in zip(outputs["triton"], outputs["eager"]):
                worst = max(worst, (fused.float() - eager.float()).abs().max().item())
    decoder = backends["triton"].decode_graphs
    assert decoder.recorded == 1 and decoder.replays == 24
    assert backends["triton"].batch_runner.fused_error is None
    assert worst <= 64 * torch.finfo(dtype).eps, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA GPU (the device machine)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_recorded_paged_rounds_on_the_gpu_equal_rounds_over_own_caches(tiny_llama, monkeypatch, dtype):
    """A page pool's recorded rounds (``PagedDecoder``: one recording per bucket and width, whichever sessions)
    against recorded rounds over the sessions' own caches, both on the Triton route; sessions of 300 positions take
    two attention chunks. cuBLAS may pick other kernels for a bucket's padded rows, so within rounding."""
    from nectar.node.backend import SpanBackend

    monkeypatch.setenv(ROUTE_ENV, "triton")
    paged = SpanBackend(
        tiny_llama,
        0,
        4,
        dtype=dtype,
        device="cuda",
        show_progress=False,
        batching=True,
        page_size=16,
        cache_bytes=64 << 20,
    )
    own = SpanBackend(tiny_llama, 0, 4, dtype=dtype, device="cuda", show_progress=False, batching=True)
    assert paged.paged is not None and paged.paged.capture and paged.batch_runner.fused
    generator = torch.Generator().manual_seed(0)
    hidden = own.hidden_size
    sessions = []
    for prefill in (5, 250, 7):
        x = torch.randn(1, prefill, hidden, generator=generator)
        caches = {"paged": paged.new_caches(0, 4, 1, 300), "own": own.new_caches(0, 4, 1, 300)}
        paged.inference_step(x, caches["paged"], start=0, end=4, position=0)
        own.inference_step(x, caches["own"], start=0, end=4, position=0)
        sessions.append([caches, prefill])
    worst = 0.0
    for step in range(12):
        for group in (sessions, sessions[:1]):
            outputs = _decode_round({"paged": paged, "own": own}, group, generator)
            for a, b in zip(outputs["paged"], outputs["own"]):
                worst = max(worst, (a.float() - b.float()).abs().max().item())
    assert paged.paged.replays == 24 and paged.batch_runner.fused_error is None
    # buckets 4 and 1, one recording each time the round's longest session doubles its pages
    assert {key[2] for key in paged.paged._graphs} == {1, 4}, list(paged.paged._graphs)
    assert worst <= 64 * torch.finfo(dtype).eps, worst


def check_kernels(dtype: torch.dtype) -> None:
    from nectar.models.families.llama import triton_decode as kernels

    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    n, hidden, eps = 3, 96, 1e-5
    residual, delta, weight = randn(n, hidden, scale=3), randn(n, hidden), randn(hidden).abs() + 0.5
    summed, normed = kernels.add_rms_norm(residual, weight, eps, delta)
    expected = delta + residual
    upcast = expected.float()
    assert torch.equal(summed, expected)
    assert torch.equal(normed, weight * (upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)).to(dtype))

    gate_up = randn(64, 2048, scale=4)
    gate, up = gate_up.chunk(2, dim=-1)
    # exp differs between libraries by an ulp of float32 (CUDA's expf, which the kernel calls on GPUs, is PyTorch's
    # there; here numpy's against Sleef's): a few float16 roundings in 10,000 go the other way, by one unit
    fused, eager = kernels.silu_mul(gate_up), F.silu(gate).mul_(up)
    differ = fused != eager
    assert differ.float().mean().item() <= 1e-3
    assert ((fused - eager).abs()[differ] <= eager.abs()[differ] * torch.finfo(dtype).eps).all()

    heads, kv_heads, dim, max_length = 4, 2, 16, 300  # 300 > ATTENTION_CHUNK: two chunks and their combination
    positions = torch.tensor([3, 17, 299])
    cos, sin = randn(max_length, dim), randn(max_length, dim)
    qkv = randn(n, heads + 2 * kv_heads, dim)
    pool = randn(n, 2, kv_heads, max_length, dim)
    expected_qkv, expected_pool = qkv.clone(), pool.clone()
    rope_in_place(expected_qkv[:, : heads + kv_heads], cos[positions][:, None], sin[positions][:, None])
    for row, position in enumerate(positions):
        expected_pool[row, :, :, position] = expected_qkv[row, heads:].view(2, kv_heads, dim)
    kernels.rope_write(qkv, cos, sin, positions, pool)
    assert torch.equal(qkv[:, :heads], expected_qkv[:, :heads])
    assert torch.equal(pool, expected_pool)

    out = kernels.attention(qkv, positions, pool, 0.25)
    for row, position in enumerate(positions):
        keys = pool[row, 0, :, : position + 1].repeat_interleave(heads // kv_heads, dim=0).float()
        values = pool[row, 1, :, : position + 1].repeat_interleave(heads // kv_heads, dim=0).float()
        reference = F.scaled_dot_product_attention(qkv[row, :heads, None].float(), keys, values, scale=0.25)
        # float32 throughout, one rounding at the end: within half a unit of the dtype's last place
        ulp = torch.finfo(dtype).eps * reference.abs().clamp_min(2**-6)
        assert ((out[row].view(heads, 1, dim).float() - reference).abs() <= ulp).all()
    check_paged_kernels(dtype, generator)


def check_paged_kernels(dtype: torch.dtype, generator: torch.Generator) -> None:
    """``rope_write`` and ``attention`` through page tables equal the same over each row's own stretch, bit for bit:
    the pages hold the rows' positions in a scattered order, 300 positions take two attention chunks."""
    from nectar.models.families.llama import triton_decode as kernels

    n, heads, kv_heads, dim, page_size, width = 3, 4, 2, 16, 8, 38  # 38 pages of 8: 304 positions a row
    positions = torch.tensor([3, 17, 299])
    cos, sin = (torch.randn(width * page_size, dim, generator=generator).to(dtype) for _ in range(2))
    qkv = torch.randn(n, heads + 2 * kv_heads, dim, generator=generator).to(dtype)
    own = torch.randn(n, 2, kv_heads, width * page_size, dim, generator=generator).to(dtype)
    order = torch.randperm(n * width, generator=generator) + 1  # page 0 is scratch
    tables = order.view(n, width)
    pages = torch.zeros(n * width + 1, page_size, 2, kv_heads, dim, dtype=dtype)
    for row in range(n):  # row's position p lives in page tables[row, p // page_size], slot p % page_size
        pages[tables[row]] = own[row].permute(2, 0, 1, 3).reshape(width, page_size, 2, kv_heads, dim)
    paged_qkv = qkv.clone()
    kernels.rope_write(qkv, cos, sin, positions, own)
    kernels.rope_write(paged_qkv, cos, sin, positions, pages, tables)
    assert torch.equal(qkv, paged_qkv)
    for row in range(n):
        laid_out = pages[tables[row]].reshape(width * page_size, 2, kv_heads, dim).permute(1, 2, 0, 3)
        assert torch.equal(laid_out, own[row])
    expected = kernels.attention(qkv, positions, own, 0.25)
    assert torch.equal(kernels.attention(paged_qkv, positions, pages, 0.25, tables), expected)


def check_paged_rounds(dtype: torch.dtype, tiny_llama: str) -> None:
    """A page pool's decode rounds on the Triton route (``PagedDecoder``, run eagerly on the CPU) against rounds
    over the sessions' own caches on the same route: bit for bit; the eager paged route within rounding."""
    from nectar.models.families.llama import graphs
    from nectar.node.backend import SpanBackend
    from nectar.node.graphs import GraphedDecoder

    backends = {}
    for name, route, page_size in (("paged", "triton", 4), ("own", "triton", 0), ("eager", "eager", 4)):
        os.environ[ROUTE_ENV] = route
        backend = SpanBackend(
            tiny_llama,
            0,
            4,
            dtype=dtype,
            device="cpu",
            show_progress=False,
            batching=True,
            page_size=page_size,
            cache_bytes=1 << 20,
        )
        if page_size == 0:
            backend.decode_graphs = GraphedDecoder(backend.batch_runner, capture=False)
        else:
            assert backend.paged is not None and backend.paged.enabled
        backends[name] = backend
    assert backends["paged"].batch_runner.fused and not backends["eager"].batch_runner.fused
    calls = []
    fused = graphs._through_blocks_fused
    graphs._through_blocks_fused = lambda *args: calls.append(isinstance(args[-1][0], tuple)) or fused(*args)
    generator = torch.Generator().manual_seed(0)
    hidden = backends["own"].hidden_size
    sessions = []
    for prefill in (3, 6, 9):
        x = torch.randn(1, prefill, hidden, generator=generator)
        caches = {name: backend.new_caches(0, 4, 1, 40) for name, backend in backends.items()}
        for name, backend in backends.items():
            backend.inference_step(x, caches[name], start=0, end=4, position=0)
        sessions.append([caches, prefill])
    worst = 0.0
    for step in range(6):  # a bucket of 4 for three sessions (a row of no session), then one alone
        for group in (sessions, sessions[1:2]):
            outputs = _decode_round(backends, group, generator)
            for paged, own, eager in zip(outputs["paged"], outputs["own"], outputs["eager"]):
                assert torch.equal(paged, own)
                worst = max(worst, (paged.float() - eager.float()).abs().max().item())
    assert backends["paged"].paged.replays == 12 and sum(calls) == 12, calls  # every round through the pages
    assert worst <= 64 * torch.finfo(dtype).eps, worst


def check_rounds(dtype: torch.dtype, tiny_llama: str, lone_length: str) -> None:
    from nectar.models.families.llama import graphs
    from nectar.node.backend import SpanBackend
    from nectar.node.graphs import GraphedDecoder

    routes = {}
    for route in ("triton", "eager"):
        os.environ[ROUTE_ENV] = route
        backend = SpanBackend(tiny_llama, 0, 4, dtype=dtype, device="cpu", show_progress=False, batching=True)
        assert backend.batch_runner.fused == (route == "triton")
        backend.decode_graphs = GraphedDecoder(backend.batch_runner, capture=False)
        routes[route] = backend
    generator = torch.Generator().manual_seed(0)
    hidden = routes["eager"].hidden_size
    sessions = []
    for prefill in (3, 5, 8, 13, 2):
        x = torch.randn(1, prefill, hidden, generator=generator)
        caches = {}
        for route, backend in routes.items():
            caches[route] = backend.new_caches(0, 4, 1, 40 if prefill != 2 else int(lone_length))
            backend.inference_step(x, caches[route], start=0, end=4, position=0)
        sessions.append([caches, prefill])
    calls = {"pooled": 0, "own": 0}
    fused = graphs._through_blocks_fused

    def counted(*args):
        calls["pooled" if isinstance(args[-1][0], torch.Tensor) else "own"] += 1
        return fused(*args)

    graphs._through_blocks_fused = counted
    worst = 0.0
    for step in range(3):
        # four sessions (a pooled round), one of them (the same recording), and the fifth session
        for group in (sessions[:4], sessions[1:2], sessions[4:]):
            outputs = _decode_round(routes, group, generator)
            for fused_out, eager_out in zip(outputs["triton"], outputs["eager"]):
                worst = max(worst, (fused_out.float() - eager_out.float()).abs().max().item())
    # the node records a round of all five (they are active together): pooled caches where their lengths are equal,
    # else each session's own buffers
    assert routes["triton"].decode_graphs.replays == 9
    assert calls == ({"pooled": 9, "own": 0} if int(lone_length) == 40 else {"pooled": 0, "own": 9}), calls
    # the only difference is attention's probabilities kept in float32 (SDPA rounds them): a few units in the last
    # place of the outputs after 4 blocks
    assert worst <= 64 * torch.finfo(dtype).eps, worst
    for session in sessions:  # the caches hold the same keys and values
        for fused_cache, eager_cache in zip(session[0]["triton"], session[0]["eager"]):
            length = eager_cache.length
            diff = (fused_cache.buffer[..., :length, :].float() - eager_cache.buffer[..., :length, :].float()).abs()
            assert diff.max().item() <= 64 * torch.finfo(dtype).eps


def check_nf4_rounds(dtype: torch.dtype, tiny_llama: str) -> None:
    """nf4 blocks: the kernels around the layers' own products (bitsandbytes') against the eager route's rounds."""
    from nectar.models.families.llama import graphs
    from nectar.node.backend import SpanBackend
    from nectar.node.graphs import GraphedDecoder

    routes = {}
    for route in ("triton", "eager"):
        os.environ[ROUTE_ENV] = route
        backend = SpanBackend(
            tiny_llama, 0, 4, dtype=dtype, device="cpu", quantization="nf4", show_progress=False, batching=True
        )
        assert backend.batch_runner.fused == (route == "triton")
        backend.decode_graphs = GraphedDecoder(backend.batch_runner, capture=False)
        routes[route] = backend
    calls = []
    fused = graphs._through_blocks_fused
    graphs._through_blocks_fused = lambda *args: calls.append(1) or fused(*args)
    generator = torch.Generator().manual_seed(0)
    hidden = routes["eager"].hidden_size
    prompt = torch.randn(1, 6, hidden, generator=generator)
    caches = {route: backend.new_caches(0, 4, 1, 40) for route, backend in routes.items()}
    for route, backend in routes.items():
        backend.inference_step(prompt, caches[route], start=0, end=4, position=0)
    worst = 0.0
    for position in range(6, 12):
        x = torch.randn(1, 1, hidden, generator=generator)
        outputs = {
            route: backend.run_inference([backend.inference_task(x, caches[route], start=0, end=4, position=position)])
            for route, backend in routes.items()
        }
        worst = max(worst, (outputs["triton"][0].float() - outputs["eager"][0].float()).abs().max().item())
    assert len(calls) == 6 and routes["triton"].decode_graphs.replays == 6
    assert worst <= 64 * torch.finfo(dtype).eps, worst


def check_fallback(dtype: torch.dtype, tiny_llama: str) -> None:
    """A GPU whose kernels Triton cannot build (its errors) falls back to PyTorch's kernels for good, with a warning;
    any other error is the round's."""
    from triton.runtime.errors import OutOfResources

    from nectar.models.families.llama import triton_decode as kernels
    from nectar.node.backend import SpanBackend

    os.environ[ROUTE_ENV] = "triton"
    backend = SpanBackend(tiny_llama, 0, 4, dtype=dtype, device="cpu", show_progress=False, batching=True)
    runner = backend.batch_runner
    assert runner.fused and "Triton" in runner.describe()
    generator = torch.Generator().manual_seed(0)
    caches = backend.new_caches(0, 4, 1, 16)
    backend.inference_step(
        torch.randn(1, 3, backend.hidden_size, generator=generator), caches, start=0, end=4, position=0
    )
    x = torch.randn(1, backend.hidden_size, generator=generator).to(dtype)
    positions = torch.tensor([3])

    def step():
        return runner.static_step(x, positions, [caches], 0)

    fused = step()
    assert runner.fused, runner.fused_error  # the kernels ran
    original = kernels.attention
    kernels.attention = lambda *args: (_ for _ in ()).throw(RuntimeError("not Triton's"))
    try:
        step()
        raise AssertionError("an error of the round itself was swallowed")
    except RuntimeError as error:
        assert "not Triton's" in str(error)
    assert runner.fused

    def unbuildable(*args):
        raise OutOfResources(1 << 20, 1 << 16, "shared memory")

    kernels.attention = unbuildable
    fallen = step()
    kernels.attention = original
    assert not runner.fused and "OutOfResources" in runner.fused_error and "Triton" not in runner.describe()
    assert torch.equal(fallen, step())  # for good: the eager route
    assert (fallen.float() - fused.float()).abs().max().item() <= 64 * torch.finfo(dtype).eps


if __name__ == "__main__":
    check, dtype_name, *rest = sys.argv[1:]
    checks = {
        "kernels": check_kernels,
        "rounds": check_rounds,
        "paged": check_paged_rounds,
        "nf4": check_nf4_rounds,
        "fallback": check_fallback,
    }
    checks[check](getattr(torch, dtype_name), *rest)
    print(f"{check} ok")
