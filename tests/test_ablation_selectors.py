"""ABS, DBS and drift-fixed (docs/design.md 4.5): signals against direct computations, the max-min
diversity order on a hand case, the budget scale, and the CLI on a tiny vision-language model."""

import json
import math

import pytest
import torch

from atv_sparse.calib import SampleTokens
from atv_sparse.convert import run
from atv_sparse.prune.ablation_tokens import (DbsTokens, DriftFixedTokens, calibrate_scale, max_min_diversity,
                                              total_budget, visual_attention)
from atv_sparse.tinybench.families import write_tiny_vlm


def test_visual_attention_matches_direct_loop():
    gen = torch.Generator().manual_seed(0)
    L, d = 9, 4
    q, k = torch.randn(4, L, d, generator=gen), torch.randn(2, L, d, generator=gen)
    visual = torch.tensor([0, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    text = ~visual
    got = visual_attention(q, k, visual, text)
    expected = []
    for v in (1, 2, 3):
        total = 0.0
        queries = [t for t in range(L) if text[t] and t > 3]
        for t in queries:
            per_head = []
            for h in range(4):
                kh = k[h // 2]
                logits = [float(q[h, t] @ kh[s]) / math.sqrt(d) for s in range(t + 1)]
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                per_head.append(math.exp(logits[v] - m) / z)
            total += sum(per_head) / 4
        expected.append(total / len(queries))
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert torch.equal(visual_attention(q, k, torch.tensor([0] * 8 + [1], dtype=torch.bool),
                                        torch.tensor([1] * 8 + [0], dtype=torch.bool)), torch.zeros(1))


def test_max_min_diversity_hand_case():
    # Points on a line; distance = |a - b|.
    pts = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 5.0])
    dist = (pts[:, None] - pts[None, :]).abs()
    # nearest-other: 0->1, 1->1, 2->1, 10->1, 11->1, 5->3: first = index 5 (value 5).
    # then min distance to {5}: 0->5, 1->4, 2->3, 10->5, 11->6 -> 11 (index 4).
    # then min to {5, 11}: 0->5, 1->4, 2->3, 10->1 -> 0 (index 0); then 1->1, 2->2, 10->1 -> index 2.
    assert max_min_diversity(dist, 4).tolist() == [5, 4, 0, 2]
    assert max_min_diversity(dist, 0).tolist() == []
    ties = torch.ones(3, 3).fill_diagonal_(0)
    assert max_min_diversity(ties, 3).tolist() == [0, 1, 2]


class _Runner:
    def __init__(self, hidden):
        self.hidden = hidden


def test_dbs_signal_is_mean_cosine_distance():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, 8, generator=gen)
    visual = torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.bool)
    sel = DbsTokens([SampleTokens(visual, ~visual)])
    (signal,) = sel.block_signals(_Runner([x]), 1)
    rows = x[0, 1:5]
    for i in range(4):
        others = [1 - torch.nn.functional.cosine_similarity(rows[i], rows[u], dim=0) for u in range(4) if u != i]
        assert abs(signal[i] - sum(others) / 3) < 1e-6


# The scaled budget of docs/design.md 4.5, written out independently of ablation_tokens.py:
# K_bj = min(n_img_j, round(min(1, c * s_b) * n_text_j)), with s_b = 1 for every block under
# drift-fixed; the total sums K over blocks and samples.
def reference_total(s_bars, counts, c, fixed):
    total = 0
    for s in s_bars:
        saliency = 1.0 if fixed else s
        for n_img, n_text in counts:
            total += min(n_img, round(min(1.0, c * saliency) * n_text))
    return total


def reference_best_total(s_bars, counts, target, fixed):
    """The reachable total closest to ``target`` (the smaller one on ties, as the smaller c gives).

    Each K_bj steps where c * s_b * n_text = k + 1/2, so evaluating halfway between consecutive
    steps (and past the last) visits every reachable total without landing on a rounding edge."""
    steps = sorted({(k + 0.5) / ((1.0 if fixed else s) * n_text)
                    for s in s_bars for _, n_text in counts for k in range(n_text)})
    probes = [steps[0] / 2] + [(a + b) / 2 for a, b in zip(steps, steps[1:])] + [steps[-1] * 2]
    reachable = {reference_total(s_bars, counts, c, fixed) for c in probes}
    return min(reachable, key=lambda t: (abs(t - target), t))


def test_scale_hits_target_and_drift_fixed_is_block_independent():
    tokens = [SampleTokens(torch.tensor([0] + [1] * 20 + [0] * 9, dtype=torch.bool),
                           torch.tensor([1] + [0] * 20 + [1] * 9, dtype=torch.bool))] * 3
    counts = [(20, 10)] * 3  # (n_img, n_text) of each sample above
    s_bars = [0.3, 0.1, 0.05]
    fixed = DriftFixedTokens(tokens)
    c = calibrate_scale(fixed, s_bars, 60)  # 3 blocks x 3 samples x K -> K = 60 / 9 ~ 6.7
    assert reference_total(s_bars, counts, c, fixed=True) in (54, 63)  # K is the same integer for every block
    # K = 7 (63) is closer to 60 than K = 6 (54).
    assert reference_best_total(s_bars, counts, 60, fixed=True) == 63
    assert reference_total(s_bars, counts, c, fixed=True) == 63
    dbs = DbsTokens(tokens)
    c = calibrate_scale(dbs, s_bars, 60)
    assert abs(reference_total(s_bars, counts, c, fixed=False) - 60) <= 3
    # Just above c = 6.5: K = 10, 7, 3 per sample in the three blocks, 3 x 20 = 60 exactly.
    assert reference_best_total(s_bars, counts, 60, fixed=False) == 60
    assert reference_total(s_bars, counts, c, fixed=False) == 60


@pytest.mark.parametrize("scale", [0.0, 0.4, 1.0, 3.3, 6.5001, 50.0], ids=str)
def test_total_budget_matches_the_reference_sum(scale):
    tokens = [SampleTokens(torch.tensor([0] + [1] * 20 + [0] * 9, dtype=torch.bool),
                           torch.tensor([1] + [0] * 20 + [1] * 9, dtype=torch.bool)),
              SampleTokens(torch.tensor([1] * 5 + [0] * 3, dtype=torch.bool),
                           torch.tensor([0] * 5 + [1] * 3, dtype=torch.bool))]
    counts = [(20, 10), (5, 3)]
    s_bars = [0.3, 0.1, 0.05]
    assert total_budget(DbsTokens(tokens), s_bars, scale) == reference_total(s_bars, counts, scale, fixed=False)
    assert total_budget(DriftFixedTokens(tokens), s_bars, scale) == reference_total(s_bars, counts, scale, fixed=True)


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory):
    return write_tiny_vlm(tmp_path_factory.mktemp("abl") / "next", "llava_next")


@pytest.mark.parametrize("tokens", ["abs", "dbs", "drift-fixed"])
def test_cli_matches_the_atv_budget(tiny_next, tmp_path, tokens):
    quick = ["--nsamples", "4", "--quiet"]
    run([str(tiny_next), "--method", "atv", "--out", str(tmp_path / "atv"), *quick])
    atv = json.loads((tmp_path / "atv" / "prune_report.json").read_text())
    target = sum(b["visual_tokens"] for b in atv["blocks"])
    run([str(tiny_next), "--method", "wanda", "--calib-tokens", tokens, "--budget-from",
         str(tmp_path / "atv" / "prune_report.json"), "--out", str(tmp_path / tokens), *quick])
    report = json.loads((tmp_path / tokens / "prune_report.json").read_text())
    settings = report["settings"]
    assert settings["budget_target"] == target and settings["scale_c"] > 0
    assert abs(settings["budget_selected"] - target) <= 0.15 * target + 8
    if tokens == "drift-fixed":
        assert report["blocks"][0]["k"] == report["blocks"][1]["k"]


def test_scale_must_be_set_before_selecting():
    from atv_sparse.errors import AtvSparseError

    text_only = SampleTokens(torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(AtvSparseError, match="drift-fixed selector: its `scale` is not set"):
        DriftFixedTokens([text_only]).begin_block(1, _Runner([]), 1)
