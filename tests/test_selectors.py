"""Token selectors (docs/design.md 4.5) against independent computations, on hand-made and random cases."""

import math

import pytest
import torch

from atv_sparse.calib import SampleTokens
from atv_sparse.prune.selectors import (AtvTokens, RandomTokens, TextTokens, VisualTokens, atv_budget,
                                        top_drift, visual_drift)


def test_visual_drift_is_one_minus_cosine():
    gen = torch.Generator().manual_seed(0)
    x_in, x_out = torch.randn(1, 9, 16, generator=gen), torch.randn(1, 9, 16, generator=gen)
    visual = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    got = visual_drift(x_in.half(), x_out.half(), visual)
    for i, pos in enumerate(visual.nonzero().flatten().tolist()):
        a, b = x_in[0, pos].half().double(), x_out[0, pos].half().double()
        expected = 1 - (a @ b) / (a.norm() * b.norm())
        assert abs(got[i].item() - expected.item()) < 1e-6
    assert got.dtype == torch.float32


@pytest.mark.parametrize("s_bar,n_img,n_text,alpha,code,paper", [
    (0.2, 100, 40, 1.0, 8, 8),       # 0.2 * 40 = 8 both ways
    (0.3, 100, 45, 1.0, 14, 13),     # 13.5: round half to even -> 14; floor -> 13
    (0.25, 100, 50, 1.0, 12, 12),    # 12.5 -> 12 (half to even); floor 12
    (0.5, 10, 40, 1.0, 10, 10),      # capped by n_img
    (0.6, 100, 40, 3.0, 40, 72),     # code clamps alpha * s_bar at 1 -> n_text; paper does not
    (0.6, 50, 40, 3.0, 40, 50),      # paper capped by n_img
    (0.4, 0, 40, 1.0, 0, 0),         # no image -> 0
    (0.4, 30, 40, 0.0, 0, 0),        # alpha 0 -> text only
])
def test_budget_rules(s_bar, n_img, n_text, alpha, code, paper):
    assert atv_budget(s_bar, n_img, n_text, alpha, "code") == code
    assert atv_budget(s_bar, n_img, n_text, alpha, "paper") == paper


def test_top_drift_ties_to_lower_position():
    drift = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.3, 0.9])
    assert top_drift(drift, 4).tolist() == [5, 1, 3, 2]
    assert top_drift(drift, 0).tolist() == []


def make_tokens(visual_rows):
    return [SampleTokens(visual=torch.tensor(v, dtype=torch.bool), text=~torch.tensor(v, dtype=torch.bool))
            for v in visual_rows]


class fake_runner:
    def __init__(self, pairs):
        self.pairs = pairs

    def pair(self, j):
        return self.pairs[j]


def test_atv_selects_text_plus_top_k_with_pooled_s_bar():
    gen = torch.Generator().manual_seed(1)
    visual_rows = [[0, 1, 1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0], [0] * 10]
    tokens = make_tokens(visual_rows)
    pairs = [(torch.randn(1, 10, 8, generator=gen), torch.randn(1, 10, 8, generator=gen)) for _ in visual_rows]
    sel = AtvTokens(tokens, alpha=1.5, budget_rule="paper")
    report = sel.begin_block(0, fake_runner(pairs), 3)
    # Independent: pooled mean of 1 - cos over every visual position of every sample.
    drifts = []
    for (x_in, x_out), v in zip(pairs, visual_rows, strict=True):
        drifts.append([1 - torch.nn.functional.cosine_similarity(x_in[0, p], x_out[0, p], dim=0).item()
                       for p in range(10) if v[p]])
    pooled = [d for ds in drifts for d in ds]
    s_bar = sum(pooled) / len(pooled)
    assert abs(report["s_bar"] - s_bar) < 1e-6
    for j, v in enumerate(visual_rows):
        n_img, n_text = sum(v), 10 - sum(v)
        k = min(n_img, math.floor(1.5 * report["s_bar"] * n_text)) if n_img else 0
        assert report["k"][j] == k
        vis_pos = [p for p in range(10) if v[p]]
        ranked = sorted(range(len(vis_pos)), key=lambda i: (-drifts[j][i], i))[:k]
        expected = sorted([p for p in range(10) if not v[p]] + [vis_pos[i] for i in ranked])
        assert sel.positions(j).tolist() == expected
    assert report["samples_without_image"] == 1 and report["visual_tokens"] == sum(report["k"])


def test_text_visual_and_alpha_zero():
    tokens = make_tokens([[0, 1, 1, 0], [1, 0, 0, 0]])
    assert TextTokens(tokens).positions(0).tolist() == [0, 3]
    assert VisualTokens(tokens).positions(1).tolist() == [0]
    pairs = [(torch.randn(1, 4, 8), torch.randn(1, 4, 8)) for _ in range(2)]
    sel = AtvTokens(tokens, alpha=0.0)
    sel.begin_block(0, fake_runner(pairs), 2)
    assert [sel.positions(j).tolist() for j in range(2)] == [[0, 3], [1, 2, 3]]


def test_random_uses_atv_budget_and_is_seeded():
    tokens = make_tokens([[0] + [1] * 12 + [0] * 6])
    pairs = [(torch.randn(1, 19, 8), torch.randn(1, 19, 8))]
    a, b = RandomTokens(tokens, seed=3), RandomTokens(tokens, seed=3)
    ra = a.begin_block(2, fake_runner(pairs), 1)
    b.begin_block(2, fake_runner(pairs), 1)
    atv = AtvTokens(tokens).begin_block(2, fake_runner(pairs), 1)
    assert ra["k"] == atv["k"] and torch.equal(a.positions(0), b.positions(0))
    assert len(a.positions(0)) == 7 + atv["k"][0]


def test_negative_alpha_is_refused():
    from atv_sparse.errors import AtvSparseError

    # the library names its parameter; the CLI shows it as --alpha (test_vlm, test_convert)
    with pytest.raises(AtvSparseError, match="`alpha` must be >= 0"):
        AtvTokens(make_tokens([[0, 1]]), alpha=-0.5)
