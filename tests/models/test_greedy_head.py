"""Greedy tokens from a bfloat16 pass plus a float32 check (models/greedy_head.py): always float32's argmax."""
import pytest
import torch

from nectar.models import load_client_head
from nectar.models.greedy_head import (
    MAX_CANDIDATES, OUTPUT_ROUNDING, LowPrecisionArgmax, candidate_threshold, choose_greedy_argmax,
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


def test_the_bound_covers_the_bfloat16_error(head_matrix):
    argmax = LowPrecisionArgmax(head_matrix)
    rows = normed_rows(200, seed=1)
    exact = rows @ head_matrix
    approx = (rows.to(torch.bfloat16) @ argmax.low).float()
    bound = rows.norm(dim=1, keepdim=True) * argmax.per_norm + approx.abs() * OUTPUT_ROUNDING
    assert ((approx - exact).abs() <= bound).all()
    assert ((approx - exact).abs() / bound).max() > 0.01  # and is not so loose that every row stays a candidate


@pytest.mark.parametrize("with_bias", [False, True])
def test_it_returns_float32_argmax_for_every_row(head_matrix, with_bias):
    bias = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2)) if with_bias else None
    argmax = LowPrecisionArgmax(head_matrix, bias)
    rows = normed_rows(300, seed=3)
    exact = rows @ head_matrix + (bias if with_bias else 0)
    assert torch.equal(argmax(rows), exact.argmax(dim=-1))


def test_a_near_tie_that_bfloat16_cannot_see_goes_to_float32s_winner():
    matrix = torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(4)) * 0.02
    row = torch.nn.functional.rms_norm(torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(5)), (HIDDEN,))
    leader = int((row @ matrix).argmax())
    last = VOCAB - 1  # after the leader: in a bfloat16 tie, argmax keeps the leader
    assert leader != last
    matrix[:, last] = matrix[:, leader] + row[0] * 1e-6  # wins by ~3e-4, far below bfloat16's resolution
    exact = row @ matrix
    assert int(exact.argmax()) == last
    assert int((row.to(torch.bfloat16) @ matrix.to(torch.bfloat16)).argmax()) != last
    assert int(LowPrecisionArgmax(matrix)(row)) == last


def test_too_many_candidates_fall_back_to_full_float32_logits(head_matrix):
    flat = (torch.randn(HIDDEN, 1) * 0.02).repeat(1, VOCAB)
    flat[:, 4321] += 1e-6  # every logit ties in bfloat16; one wins in float32
    calls = []

    def full_logits(rows):
        calls.append(rows.shape[0])
        return rows @ flat

    row = torch.ones(1, HIDDEN)
    assert int(LowPrecisionArgmax(flat)(row, full_logits)) == 4321
    assert calls == [1] and VOCAB > MAX_CANDIDATES


def test_non_finite_rows_take_the_float32_path(head_matrix):
    calls = []
    row = torch.full((1, HIDDEN), float("nan"))
    LowPrecisionArgmax(head_matrix)(row, lambda rows: calls.append(1) or rows @ head_matrix)
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
        return choose_greedy_argmax(head_matrix, None, full_logits=lambda rows: rows @ head_matrix,
                                    final_norm=lambda rows: rows)

    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "off")
    assert choose() is None
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "bf16")
    assert isinstance(choose(), LowPrecisionArgmax)
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "auto")
    assert choose() is None  # 1.3M weights: below MIN_HEAD_WEIGHTS, not worth a measurement
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "int4")
    with pytest.raises(ValueError, match="NECTAR_GREEDY_HEAD must be auto, bf16 or off"):
        choose()


def test_auto_measures_both_routes_on_a_large_head(monkeypatch, caplog):
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "auto")
    matrix = torch.randn(512, 16384) * 0.02  # 8.4M weights, 33.5 MB
    with caplog.at_level("INFO", logger="nectar.models.greedy_head"):
        chosen = choose_greedy_argmax(matrix, None, full_logits=lambda rows: rows @ matrix,
                                      final_norm=lambda rows: rows)
    assert "Greedy head:" in caplog.text and "as fast as float32 logits" in caplog.text
    assert chosen is None or isinstance(chosen, LowPrecisionArgmax)


def test_the_client_head_gives_the_same_greedy_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "bf16")
    path = save_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=1)
    head = load_client_head(path)
    assert head.greedy_argmax is not None
    with torch.no_grad():
        for seed in range(20):
            hidden = torch.randn(1, 1, head.embedding_dim, generator=torch.Generator().manual_seed(seed)) * 3
            assert torch.equal(head.greedy_tokens(hidden), head.logits(hidden)[:, -1].argmax(dim=-1))
        batch = torch.randn(3, 1, head.embedding_dim)  # several rows: float32 logits
        assert torch.equal(head.greedy_tokens(batch), head.logits(batch)[:, -1].argmax(dim=-1))
