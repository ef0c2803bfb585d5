"""CPU products through the faster BLAS (models/cpu_blas.py): same results as PyTorch's, chosen per row count."""
import pytest
import torch

from nectar.models import load_client_head
from nectar.models.cpu_blas import ROW_BUCKETS, CpuMatmul
from nectar.models.tiny import save_tiny_checkpoint


@pytest.fixture()
def matrix():
    return torch.randn(96, 200, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 70])
def test_openblas_products_equal_pytorch_to_rounding(matrix, rows):
    x = torch.randn(rows, 96)
    bias = torch.randn(200)
    everywhere, never = CpuMatmul(ROW_BUCKETS), CpuMatmul(())
    torch.testing.assert_close(everywhere(x, matrix), x @ matrix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(everywhere(x, matrix, bias), torch.addmm(bias, x, matrix), rtol=1e-5, atol=1e-5)
    assert torch.equal(never(x, matrix, bias), torch.addmm(bias, x, matrix))


def test_the_library_is_chosen_per_row_bucket(matrix, monkeypatch):
    calls = []
    real_matmul = __import__("numpy").matmul
    monkeypatch.setattr("nectar.models.cpu_blas.np.matmul", lambda *a: calls.append(a[0].shape[0]) or real_matmul(*a))
    plan = CpuMatmul([1, 8])  # OpenBLAS for one row and for 5-8 rows
    for rows in (1, 2, 4, 6, 8, 9, 100):
        plan(torch.randn(rows, 96), matrix)
    assert calls == [1, 6, 8]
    plan(torch.randn(1, 96, dtype=torch.float64), matrix.double())  # numpy only for float32
    assert calls == [1, 6, 8]


def test_calibration_measures_each_bucket_and_follows_the_environment(matrix, monkeypatch):
    monkeypatch.delenv("NECTAR_CPU_BLAS", raising=False)
    plan = CpuMatmul.calibrate([matrix], rows=(1, 4))
    assert set(plan.gains) == {1, 4} and all(gain > 0 for gain in plan.gains.values())
    assert plan.openblas_rows <= {1, 4}
    assert "OpenBLAS speed-up" in plan.describe()
    monkeypatch.setenv("NECTAR_CPU_BLAS", "torch")
    assert CpuMatmul.calibrate([matrix]).openblas_rows == frozenset()
    monkeypatch.setenv("NECTAR_CPU_BLAS", "openblas")
    assert CpuMatmul.calibrate([matrix]).openblas_rows == frozenset(ROW_BUCKETS)
    monkeypatch.setenv("NECTAR_CPU_BLAS", "fast")
    with pytest.raises(ValueError, match="NECTAR_CPU_BLAS must be auto, torch or openblas"):
        CpuMatmul.calibrate([matrix])


def test_the_client_head_gives_the_same_logits_and_gradients_through_either_library(tmp_path, monkeypatch):
    monkeypatch.setenv("NECTAR_CPU_BLAS", "openblas")
    path = save_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=1)
    head = load_client_head(path)
    assert head.matmul.openblas_rows == frozenset(ROW_BUCKETS)
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
    for library in ("torch", "openblas"):
        monkeypatch.setenv("NECTAR_CPU_BLAS", library)
        backend = SpanBackend(path, 0, 2, dtype=torch.float32, device="cpu", show_progress=False)
        assert backend.batch_runner.matmul.openblas_rows == (frozenset(ROW_BUCKETS) if library == "openblas" else set())
        torch.manual_seed(0)
        prompt, steps = torch.randn(1, 5, 64), [torch.randn(1, 1, 64) for _ in range(3)]
        caches = backend.new_caches(0, 2, 1, 16)
        results = [backend.inference_step(prompt, caches, start=0, end=2, position=0)]
        results += [backend.inference_step(step, caches, start=0, end=2, position=5 + i) for i, step in enumerate(steps)]
        outputs[library] = torch.cat([r.reshape(-1, 64) for r in results])
    torch.testing.assert_close(outputs["openblas"], outputs["torch"], rtol=1e-5, atol=1e-5)
