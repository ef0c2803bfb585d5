"""CPU products through the fastest library (models/cpu_blas.py): same results as PyTorch's, chosen per row count."""

import pytest
import torch

from nectar.models import load_client_head, native
from nectar.models.cpu_blas import NATIVE_MAX_ROWS, ROW_BUCKETS, CpuMatmul, native_kernel
from nectar.models.tiny import save_tiny_checkpoint


@pytest.fixture()
def matrix():
    return torch.randn(96, 200, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("library", ["openblas", "native"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 70])
def test_products_equal_pytorch_to_rounding(matrix, rows, library):
    x = torch.randn(rows, 96)
    bias = torch.randn(200)
    everywhere, never = CpuMatmul.everywhere(library), CpuMatmul()
    torch.testing.assert_close(everywhere(x, matrix), x @ matrix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(everywhere(x, matrix, bias), torch.addmm(bias, x, matrix), rtol=1e-5, atol=1e-5)
    assert torch.equal(never(x, matrix, bias), torch.addmm(bias, x, matrix))


def test_the_native_kernel_builds_here_and_handles_every_width_and_odd_inputs():
    assert native_kernel() is not None, "the CI machine has gcc: the kernel must build"
    plan = CpuMatmul.everywhere("native")
    for n_in, n_out in [(1, 1), (7, 5), (33, 8), (64, 31), (65, 40), (130, 97)]:  # every tail of the 32/8 unrolling
        x, matrix, bias = torch.randn(3, n_in), torch.randn(n_in, n_out), torch.randn(n_out)
        torch.testing.assert_close(plan(x, matrix, bias), torch.addmm(bias, x, matrix), rtol=1e-5, atol=1e-5)
    # a non-contiguous input row is copied, a transposed weight view falls back to PyTorch
    x = torch.randn(96, 4).t()
    matrix = torch.randn(200, 96)
    torch.testing.assert_close(plan(x, matrix.t()), x @ matrix.t(), rtol=1e-5, atol=1e-5)
    # non-finite inputs propagate as in BLAS
    x = torch.randn(1, 96)
    x[0, 5] = float("nan")
    assert torch.isnan(plan(x, torch.randn(96, 200))).all()


def test_the_kernel_is_compiled_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NECTAR_KERNEL_CACHE", str(tmp_path))
    native.load.cache_clear()
    try:
        assert native.load("kernels") is not None
        built = list(tmp_path.glob("kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.load.cache_clear()
        assert native.load("kernels") is not None
        assert [p.stat().st_mtime_ns for p in tmp_path.glob("kernels-*.so")] == [stamp]  # not rebuilt
        assert not list(tmp_path.glob("*.so.*")) and len(list(tmp_path.iterdir())) == 1  # no temporary left
    finally:
        native.load.cache_clear()


def test_without_a_compiler_pytorch_computes_and_forcing_the_kernel_says_what_to_do(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NECTAR_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.load.cache_clear()
    try:
        assert native_kernel() is None
        assert "could not be built" in caplog.text
        monkeypatch.delenv("NECTAR_CPU_BLAS", raising=False)
        plan = CpuMatmul.calibrate([torch.randn(96, 200)], rows=(1, 2))
        assert plan.rows_for("native") == frozenset() and all("native" not in g for g in plan.gains.values())
        with pytest.raises(RuntimeError, match="NECTAR_CPU_BLAS=auto, torch or openblas"):
            CpuMatmul.everywhere("native")
    finally:
        native.load.cache_clear()


def test_the_library_is_chosen_per_row_bucket(matrix, monkeypatch):
    calls = []
    real_matmul = __import__("numpy").matmul
    monkeypatch.setattr("nectar.models.cpu_blas.np.matmul", lambda *a: calls.append(a[0].shape[0]) or real_matmul(*a))
    native_calls = []
    real_native = __import__("nectar.models.cpu_blas", fromlist=["native_matmul"]).native_matmul
    monkeypatch.setattr(
        "nectar.models.cpu_blas.native_matmul", lambda x, *a: native_calls.append(x.shape[0]) or real_native(x, *a)
    )
    plan = CpuMatmul({1: "openblas", 8: "openblas", 2: "native"})  # OpenBLAS for one row and for 5-8 rows
    for rows in (1, 2, 4, 6, 8, 9, 100):
        plan(torch.randn(rows, 96), matrix)
    assert calls == [1, 6, 8] and native_calls == [2]
    plan(torch.randn(1, 96, dtype=torch.float64), matrix.double())  # numpy only for float32
    assert calls == [1, 6, 8]


def test_calibration_measures_each_bucket_and_follows_the_environment(matrix, monkeypatch):
    monkeypatch.delenv("NECTAR_CPU_BLAS", raising=False)
    plan = CpuMatmul.calibrate([matrix], rows=(1, 4, 16))
    assert set(plan.gains) == {1, 4, 16}
    assert set(plan.gains[1]) == {"openblas", "native"} and set(plan.gains[16]) == {"openblas"}  # native: <= 8 rows
    assert all(gain > 0 for gains in plan.gains.values() for gain in gains.values())
    assert plan.rows_for("openblas") | plan.rows_for("native") <= {1, 4, 16}
    assert 16 not in plan.rows_for("native") and NATIVE_MAX_ROWS < 16
    assert "speed-up over PyTorch: 1 row: OpenBLAS" in plan.describe()
    for library in ("torch", "openblas", "native"):
        monkeypatch.setenv("NECTAR_CPU_BLAS", library)
        assert CpuMatmul.calibrate([matrix]).rows_for(library) == frozenset(ROW_BUCKETS)
    monkeypatch.setenv("NECTAR_CPU_BLAS", "fast")
    with pytest.raises(ValueError, match="NECTAR_CPU_BLAS must be auto, torch, openblas or native"):
        CpuMatmul.calibrate([matrix])


def test_the_client_head_gives_the_same_logits_and_gradients_through_either_library(tmp_path, monkeypatch):
    monkeypatch.setenv("NECTAR_CPU_BLAS", "openblas")
    path = save_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=1)
    head = load_client_head(path)
    assert head.matmul.rows_for("openblas") == frozenset(ROW_BUCKETS)
    hidden = torch.randn(2, 3, head.embedding_dim)
    with torch.no_grad():
        expected = torch.nn.functional.linear(head.norm(hidden), head.lm_head.weight)
        torch.testing.assert_close(head.logits(hidden), expected, rtol=1e-5, atol=1e-5)
    # prompt tuning: gradients flow back through the head to its input
    hidden.requires_grad_(True)
    head.logits(hidden).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_a_node_span_computes_the_same_steps_through_either_library(tmp_path, monkeypatch):
    from nectar.node.backend import SpanBackend

    path = save_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=2)
    outputs = {}
    for library in ("torch", "openblas", "native"):
        monkeypatch.setenv("NECTAR_CPU_BLAS", library)
        backend = SpanBackend(path, 0, 2, dtype=torch.float32, device="cpu", show_progress=False)
        assert backend.batch_runner.matmul.rows_for(library) == frozenset(ROW_BUCKETS)
        torch.manual_seed(0)
        prompt, steps = torch.randn(1, 5, 64), [torch.randn(1, 1, 64) for _ in range(3)]
        caches = backend.new_caches(0, 2, 1, 16)
        results = [backend.inference_step(prompt, caches, start=0, end=2, position=0)]
        results += [
            backend.inference_step(step, caches, start=0, end=2, position=5 + i) for i, step in enumerate(steps)
        ]
        outputs[library] = torch.cat([r.reshape(-1, 64) for r in results])
    torch.testing.assert_close(outputs["openblas"], outputs["torch"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["native"], outputs["torch"], rtol=1e-5, atol=1e-5)
