"""Greedy tokens from a bfloat16 or int8 pass plus a float32 check (models/greedy_head.py): always float32's argmax."""

import pytest
import torch

from nectar.models import load_client_head, native
from nectar.models.greedy_head import (
    FORMATS,
    MAX_CANDIDATES,
    OUTPUT_ROUNDING,
    LowPrecisionArgmax,
    bound_holds,
    candidate_threshold,
    choose_greedy_argmax,
)
from nectar.models.tiny import save_tiny_checkpoint

HIDDEN, VOCAB = 256, 5000


@pytest.fixture(scope="module")
def head_matrix():
    return torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(0)) * 0.02  # [in, out]


def normed_rows(count, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, HIDDEN, generator=generator) * (1 + torch.arange(count)[:, None] % 5)
    rows[::7, seed % HIDDEN] = 30.0  # outliers, as large activations in real models
    return torch.nn.functional.rms_norm(rows, (HIDDEN,))


@pytest.mark.parametrize("format", FORMATS)
def test_the_bound_covers_the_low_precision_error(head_matrix, format):
    argmax = LowPrecisionArgmax(head_matrix, format=format)
    rows = normed_rows(200, seed=1)
    exact = rows @ head_matrix
    approx = argmax.approximate(rows)
    bound = rows.norm(dim=1, keepdim=True) * argmax.per_norm + approx.abs() * OUTPUT_ROUNDING
    assert ((approx - exact).abs() <= bound).all()
    assert ((approx - exact).abs() / bound).max() > 0.01  # and is not so loose that every row stays a candidate
    assert bound_holds(argmax, rows, exact)


def test_int8_stores_a_quarter_of_the_bytes_and_a_looser_bound(head_matrix):
    bf16, int8 = LowPrecisionArgmax(head_matrix), LowPrecisionArgmax(head_matrix, format="int8")
    assert int8.low.dtype == torch.int8 and int8.low.numel() == head_matrix.numel()
    assert int8.low.nbytes * 4 == head_matrix.nbytes and bf16.low.nbytes * 2 == head_matrix.nbytes
    assert bf16.per_norm < int8.per_norm < 10 * bf16.per_norm
    assert int8.refine_per_norm == pytest.approx(bf16.per_norm)  # the refining rows are the bfloat16 roundings


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_it_returns_float32_argmax_for_every_row(head_matrix, with_bias, format):
    bias = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2)) if with_bias else None
    argmax = LowPrecisionArgmax(head_matrix, bias, format=format)
    rows = normed_rows(300, seed=3)
    exact = rows @ head_matrix + (bias if with_bias else 0)
    assert torch.equal(argmax(rows), exact.argmax(dim=-1))


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_c_int8_pass_agrees_with_pytorchs_kernel_and_is_tighter(head_matrix, with_bias):
    bias = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) if with_bias else None
    argmax = LowPrecisionArgmax(head_matrix, bias, format="int8")
    assert argmax.int8_logits is not None, "the CI machine has gcc: the C pass must build"
    rows = normed_rows(100, seed=8)
    exact = rows @ head_matrix + (bias if with_bias else 0)
    through_c = argmax.approximate(rows)
    argmax.int8_logits = None  # PyTorch's weight-only int8 kernel
    through_pytorch = argmax.approximate(rows)
    # PyTorch rounds x and the sum to bfloat16; the C pass does neither, so it sits closer to the float32 logits
    assert (through_c - through_pytorch).abs().max() <= (through_pytorch.abs() * OUTPUT_ROUNDING).max() + 1e-3
    assert (through_c - exact).abs().mean() < (through_pytorch - exact).abs().mean()
    argmax.int8_logits = LowPrecisionArgmax(head_matrix, bias, format="int8").int8_logits
    assert bound_holds(argmax, rows, exact) and torch.equal(argmax(rows), exact.argmax(dim=-1))


def test_without_c_kernels_the_int8_pass_uses_pytorchs_kernel(head_matrix, monkeypatch):
    monkeypatch.setenv("NECTAR_NATIVE", "off")
    native.load.cache_clear()
    try:
        argmax = LowPrecisionArgmax(head_matrix, format="int8")
        assert argmax.int8_logits is None
        rows = normed_rows(50, seed=9)
        assert torch.equal(argmax(rows), (rows @ head_matrix).argmax(dim=-1))
    finally:
        native.load.cache_clear()


def test_int8_candidates_past_the_limit_are_narrowed_by_bfloat16_rows():
    hidden = 2048  # wide rows: the int8 bound (|x|_2 times the row error) leaves hundreds of candidates
    matrix = torch.randn(hidden, 20000, generator=torch.Generator().manual_seed(6)) * 0.02
    argmax = LowPrecisionArgmax(matrix, format="int8")
    rows = torch.nn.functional.rms_norm(torch.randn(40, hidden, generator=torch.Generator().manual_seed(7)), (hidden,))
    approx = argmax.approximate(rows)
    first_pass = [
        int((approx[n] >= candidate_threshold(float(approx[n].max()), float(rows[n].norm()) * argmax.per_norm)).sum())
        for n in range(len(rows))
    ]
    assert max(first_pass) > MAX_CANDIDATES
    full_calls = []
    tokens = argmax(rows, lambda r: full_calls.append(1) or r @ matrix)
    assert torch.equal(tokens, (rows @ matrix).argmax(dim=-1))
    assert len(full_calls) < sum(count > MAX_CANDIDATES for count in first_pass)


@pytest.mark.parametrize("format", FORMATS)
def test_a_near_tie_that_low_precision_cannot_see_goes_to_float32s_winner(format):
    matrix = torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(4)) * 0.02
    row = torch.nn.functional.rms_norm(torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(5)), (HIDDEN,))
    leader = int((row @ matrix).argmax())
    last = VOCAB - 1  # after the leader: in a bfloat16 tie, argmax keeps the leader
    assert leader != last
    matrix[:, last] = matrix[:, leader] + row[0] * 1e-6  # wins by ~3e-4, far below bfloat16's resolution
    exact = row @ matrix
    assert int(exact.argmax()) == last
    assert int((row.to(torch.bfloat16) @ matrix.to(torch.bfloat16)).argmax()) != last
    assert int(LowPrecisionArgmax(matrix, format=format)(row)) == last


@pytest.mark.parametrize("format", FORMATS)
def test_too_many_candidates_fall_back_to_full_float32_logits(format):
    flat = (torch.randn(HIDDEN, 1) * 0.02).repeat(1, VOCAB)
    flat[:, 4321] += 1e-6  # every logit ties in bfloat16; one wins in float32
    calls = []

    def full_logits(rows):
        calls.append(rows.shape[0])
        return rows @ flat

    row = torch.ones(1, HIDDEN)
    assert int(LowPrecisionArgmax(flat, format=format)(row, full_logits)) == 4321
    assert calls == [1] and VOCAB > MAX_CANDIDATES


@pytest.mark.parametrize("format", FORMATS)
def test_non_finite_rows_take_the_float32_path(head_matrix, format):
    calls = []
    row = torch.full((1, HIDDEN), float("nan"))
    LowPrecisionArgmax(head_matrix, format=format)(row, lambda rows: calls.append(1) or rows @ head_matrix)
    assert calls == [1]


def test_the_candidate_threshold_keeps_every_row_that_can_still_win():
    for best, shared in [(3.0, 0.1), (-2.0, 0.05), (0.01, 0.2), (0.0, 0.0)]:
        threshold = candidate_threshold(best, shared)
        low_of_best = best - shared - abs(best) * OUTPUT_ROUNDING
        for a in torch.linspace(threshold - 1, best, 200).tolist():
            reachable = a + shared + abs(a) * OUTPUT_ROUNDING >= low_of_best
            assert reachable == (a >= threshold) or abs(a - threshold) < 1e-9


def test_the_choice_follows_the_environment(head_matrix, monkeypatch):
    def choose():
        return choose_greedy_argmax(
            head_matrix, None, full_logits=lambda rows: rows @ head_matrix, final_norm=lambda rows: rows
        )

    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "off")
    assert choose() is None
    for format in FORMATS:
        monkeypatch.setenv("NECTAR_GREEDY_HEAD", format)
        assert choose().format == format
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "auto")
    assert choose() is None  # 1.3M weights: below MIN_HEAD_WEIGHTS, not worth a measurement
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "int4")
    with pytest.raises(ValueError, match="NECTAR_GREEDY_HEAD must be auto, bf16, int8 or off"):
        choose()


def test_int8_needs_a_hidden_size_its_kernel_reads(monkeypatch):
    matrix = torch.randn(100, 1000) * 0.02  # the kernel reads 16 inputs at a time: 100 would give wrong sums
    with pytest.raises(ValueError, match="multiple of 16.*NECTAR_GREEDY_HEAD=bf16"):
        LowPrecisionArgmax(matrix, format="int8")
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "bf16")
    assert choose_greedy_argmax(matrix, None, lambda rows: rows @ matrix, lambda rows: rows).format == "bf16"


def test_auto_measures_both_routes_on_a_large_head(monkeypatch, caplog):
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "auto")
    matrix = torch.randn(512, 16384) * 0.02  # 8.4M weights, 33.5 MB
    with caplog.at_level("INFO", logger="nectar.models.greedy_head"):
        chosen = choose_greedy_argmax(
            matrix, None, full_logits=lambda rows: rows @ matrix, final_norm=lambda rows: rows
        )
    assert "Greedy head:" in caplog.text and "as fast as float32 logits" in caplog.text
    assert "bf16 pass with float32 check" in caplog.text and "int8 pass with float32 check" in caplog.text
    assert chosen is None or chosen.format in FORMATS


def test_auto_drops_a_pass_whose_kernel_fails(monkeypatch, caplog):
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "auto")
    matrix = torch.randn(512, 16384) * 0.02
    honest = LowPrecisionArgmax.approximate

    def no_int8_kernel(self, rows):  # as a PyTorch build without the int8 CPU kernel would
        if self.format == "int8":
            raise NotImplementedError("_weight_int8pack_mm is not implemented for this backend")
        return honest(self, rows)

    monkeypatch.setattr(LowPrecisionArgmax, "approximate", no_int8_kernel)
    with caplog.at_level("INFO", logger="nectar.models.greedy_head"):
        chosen = choose_greedy_argmax(
            matrix,
            None,
            full_logits=lambda rows: rows @ matrix,
            final_norm=lambda rows: torch.nn.functional.rms_norm(rows, (512,)),
        )
    assert "the int8 pass failed (_weight_int8pack_mm is not implemented" in caplog.text
    assert chosen is None or chosen.format == "bf16"
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "int8")
    with pytest.raises(RuntimeError, match="int8 greedy head failed.*NECTAR_GREEDY_HEAD=auto or off"):
        choose_greedy_argmax(matrix, None, full_logits=lambda rows: rows @ matrix, final_norm=lambda rows: rows)


def test_auto_drops_a_pass_that_breaks_its_bound(monkeypatch, caplog):
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "auto")
    matrix = torch.randn(512, 16384) * 0.02
    honest = LowPrecisionArgmax.approximate

    def off_by_one_for_int8(self, rows):  # as a kernel that sums the wrong inputs would
        return honest(self, rows) + (1.0 if self.format == "int8" else 0.0)

    monkeypatch.setattr(LowPrecisionArgmax, "approximate", off_by_one_for_int8)
    with caplog.at_level("INFO", logger="nectar.models.greedy_head"):
        chosen = choose_greedy_argmax(
            matrix,
            None,
            full_logits=lambda rows: rows @ matrix,
            final_norm=lambda rows: torch.nn.functional.rms_norm(rows, (512,)),
        )
    assert "the int8 pass broke its error bound on this machine" in caplog.text
    assert "int8 pass with float32 check" not in caplog.text
    assert chosen is None or chosen.format == "bf16"
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "int8")  # asked for by name: an error that says what to set instead
    with pytest.raises(RuntimeError, match="int8 greedy head broke its error bound.*NECTAR_GREEDY_HEAD=auto or off"):
        choose_greedy_argmax(matrix, None, full_logits=lambda rows: rows @ matrix, final_norm=lambda rows: rows)


@pytest.mark.parametrize("format", FORMATS)
def test_the_client_head_gives_the_same_greedy_tokens(tmp_path, monkeypatch, format):
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", format)
    path = save_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=1)
    head = load_client_head(path)
    assert head.greedy_argmax is not None
    with torch.no_grad():
        for seed in range(20):
            hidden = torch.randn(1, 1, head.embedding_dim, generator=torch.Generator().manual_seed(seed)) * 3
            assert torch.equal(head.greedy_tokens(hidden), head.logits(hidden)[:, -1].argmax(dim=-1))
        batch = torch.randn(3, 1, head.embedding_dim)  # several rows: float32 logits
        assert torch.equal(head.greedy_tokens(batch), head.logits(batch)[:, -1].argmax(dim=-1))
