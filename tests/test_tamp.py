"""TAMP baseline core (docs/design.md 4.6): attention contribution, modality similarity, AMIA
selection, token-counted statistics and DAS, on hand-checked cases plus a literal float64
transcription of the spec on random data.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atv_sparse.errors import AtvSparseError
from atv_sparse.prune.tamp import (
    TampStats,
    _neighbours,
    _smallest_stable,
    amia_select,
    attention_contribution,
    das_allocation,
    das_keep_counts,
    das_score,
    modality_similarity,
    tamp_update,
)
from atv_sparse.prune.wanda import wanda_score

E = math.exp(-1.0)  # Kx between orthogonal unit rows: exp(-||u - v||^2 / 2) = exp(-1)
E1, E2, E3 = torch.eye(3)


def _mask(bits: str) -> torch.Tensor:
    return torch.tensor([c == "v" for c in bits], dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# literal float64 transcription of docs/design.md 4.6 (independent of the module's heap / prefix sums)
# ---------------------------------------------------------------------------------------------


def literal_rho(unit64: torch.Tensor, visual: torch.Tensor) -> float:
    def mean_pos_upper(rows):
        upper = torch.triu(rows @ rows.t(), diagonal=1)
        return upper[upper > 0].mean().item()

    v, t = unit64[visual], unit64[~visual]
    return (mean_pos_upper(v) + mean_pos_upper(t) + (v @ t.t()).mean().item()) / 3


def literal_kernel(unit64: torch.Tensor) -> torch.Tensor:
    diff = unit64[:, None, :] - unit64[None, :, :]
    return torch.exp(-(diff * diff).sum(-1) / 2)


def literal_mmd2(kernel: torch.Tensor, sel: list[int]) -> float:
    idx = torch.tensor(sel)
    return (kernel.mean() + kernel[idx][:, idx].mean() - 2 * kernel[:, idx].mean()).item()


def literal_amia(O: torch.Tensor, a: torch.Tensor, visual: torch.Tensor) -> list[int]:
    """The spec's loop step by step on full vectors. D is the same fp32 ``1 - U U^T`` and g the
    same float64 expression as the module's, so exact ties (repeated tokens) round alike; the
    neighbour sort, the greedy loop, rho and the MMD (float64 Kx, fresh means) are independent."""
    unit32 = F.normalize(O.float(), dim=-1, eps=1e-12)
    unit = unit32.double()
    length = unit.shape[0]
    dist32 = 1 - unit32 @ unit32.t()
    dist = dist32.tolist()
    nbr = [sorted((k for k in range(length) if k != i), key=lambda k: (dist[i][k], k))[:3]
           for i in range(length)]
    nbr_t = torch.tensor(nbr)
    nbr_d = torch.gather(dist32, 1, nbr_t).double()
    g = a.float().double() + (torch.exp(-nbr_d) * a.float().double()[nbr_t]).sum(dim=1)
    kernel = literal_kernel(unit)
    threshold = 0.1 * math.sqrt(max(1 - literal_rho(unit, visual), 0.0))
    sel: list[int] = []
    while True:
        i = int(torch.argmax(g))  # first maximum
        gi = max(g[i].item(), 0.0)  # read before i joins S
        for j, n in enumerate(nbr[i]):
            g[n] -= torch.exp(-0.2 * nbr_d[i, j]).item() * gi
        sel.append(i)
        g[sel] = g.min() - 1  # min after the suppression
        if literal_mmd2(kernel, sel) < threshold or len(sel) == length:
            return sel


# ---------------------------------------------------------------------------------------------
# attention contribution
# ---------------------------------------------------------------------------------------------


def _direct_attention(q, k, last, keys):
    """Loop over query heads with an explicitly repeated k (kv head h // rep)."""
    rep = q.shape[0] // k.shape[0]
    k_rep = k.float().repeat_interleave(rep, dim=0)
    rows = []
    for h in range(q.shape[0]):
        logits = q[h, last].float() @ k_rep[h, keys].t() / math.sqrt(q.shape[-1])
        full = torch.zeros(q.shape[1])
        full[keys] = torch.softmax(logits, dim=-1)
        rows.append(full)
    return torch.stack(rows).mean(0)


def test_attention_contribution_gqa_matches_direct():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 7, 8, generator=gen)
    k = torch.randn(2, 7, 8, generator=gen)
    a = attention_contribution(q, k, last=6)
    assert a.shape == (7,) and a.dtype == torch.float32
    torch.testing.assert_close(a, _direct_attention(q, k, 6, torch.arange(7)), rtol=1e-6, atol=1e-7)
    assert abs(a.sum().item() - 1) < 1e-6
    # the head mapping matters: tiling kv heads (h -> h % 2) instead gives something else
    tiled = torch.stack([torch.softmax(q[h, 6] @ k[h % 2].t() / math.sqrt(8), -1) for h in range(4)]).mean(0)
    assert not torch.allclose(a, tiled)


def test_attention_contribution_matches_transformers_repeat_kv():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(6, 5, 4, generator=gen)
    k = torch.randn(2, 5, 4, generator=gen)
    k_rep = modeling_llama.repeat_kv(k[None], 3)[0]
    weights = torch.softmax(q @ k_rep.transpose(1, 2) / 2.0, dim=-1)[:, -1]  # causal row L-1: all keys
    torch.testing.assert_close(attention_contribution(q, k, 4), weights.mean(0), rtol=1e-6, atol=1e-7)


def test_attention_contribution_causal_cut_and_key_mask():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 4, generator=gen)
    k = torch.randn(2, 6, 4, generator=gen)
    # last = 3 (positions 4, 5 are right padding): keys after it get exactly 0
    a = attention_contribution(q, k, last=3)
    assert torch.equal(a[4:], torch.zeros(2))
    torch.testing.assert_close(a, _direct_attention(q, k, 3, torch.arange(4)), rtol=1e-6, atol=1e-7)
    # left padding at position 0 masked out by key_mask
    key_mask = torch.tensor([False, True, True, True, True, True])
    a = attention_contribution(q, k, last=5, key_mask=key_mask)
    assert a[0].item() == 0.0
    torch.testing.assert_close(a, _direct_attention(q, k, 5, torch.arange(1, 6)), rtol=1e-6, atol=1e-7)
    assert abs(a.sum().item() - 1) < 1e-6


def test_attention_contribution_upcasts_half_inputs():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 5, 8, generator=gen).bfloat16()
    k = torch.randn(1, 5, 8, generator=gen).bfloat16()
    a = attention_contribution(q, k, 4)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, attention_contribution(q.float(), k.float(), 4), rtol=0, atol=0)


@pytest.mark.parametrize("q_shape,k_shape,last", [
    ((4, 5, 8), (3, 5, 8), 4),  # 4 query heads over 3 kv heads
    ((4, 5, 8), (2, 6, 8), 4),  # lengths differ
    ((4, 5, 8), (2, 5, 8), 5),  # last out of range
    ((4, 5, 8), (2, 5, 8), -1),
])
def test_attention_contribution_bad_shapes(q_shape, k_shape, last):
    # q and k come from the model's own projections: a mismatch is a broken invariant, not bad input
    with pytest.raises(AssertionError):
        attention_contribution(torch.zeros(q_shape), torch.zeros(k_shape), last)


# ---------------------------------------------------------------------------------------------
# modality similarity
# ---------------------------------------------------------------------------------------------


def test_modality_similarity_hand_case():
    # rows (interleaved): v0=(1,0) t0=3*(1,0) v1=(.6,.8) t1=(.8,.6) v2=(0,1) t2=(-.6,-.8)
    O = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0], [-0.6, -0.8]])
    visual = _mask("vtvtvt")
    m = modality_similarity(O, visual)
    # visual pairs: v0.v1 = .6, v0.v2 = 0 (not > 0, dropped), v1.v2 = .8  -> m_vv = .7
    # text pairs:   t0.t1 = .8, t0.t2 = -.6, t1.t2 = -.96 (dropped)       -> m_ll = .8
    # V x L (all 9): v0: 1 + .8 - .6 = 1.2; v1: .6 + .96 - 1 = .56; v2: 0 + .6 - .8 = -.2
    #   -> m_vl = 1.56 / 9
    assert m.m_vv == pytest.approx(0.7, abs=1e-6)
    assert m.m_ll == pytest.approx(0.8, abs=1e-6)
    assert m.m_vl == pytest.approx(1.56 / 9, abs=1e-6)
    assert m.rho == pytest.approx((0.7 + 0.8 + 1.56 / 9) / 3, abs=1e-6)
    m_vv, m_ll, m_vl, rho = m  # unpacks as a tuple
    assert rho == m.rho
    assert das_score(m_vv, m_ll, m_vl) == pytest.approx(3 - 0.7 - 0.8 - 1.56 / 9, abs=1e-6)


@pytest.mark.parametrize("rows,bits,needle", [
    ([[1, 0], [1, 1], [0, 1], [1, 2]], "vttt", "1 visual and 3 text"),
    ([[1, 0], [1, 1], [0, 1], [1, 2]], "vvvt", "3 visual and 1 text"),
    # visual rows orthogonal: their triangle has no positive entry
    ([[1, 0], [0, 1], [1, 1], [2, 1]], "vvtt", "visual"),
    # text rows opposite
    ([[1, 0], [1, 1], [1, 2], [-1, -2]], "vvtt", "text"),
])
def test_modality_similarity_errors_name_the_sample(rows, bits, needle):
    with pytest.raises(AtvSparseError, match=needle) as err:
        modality_similarity(torch.tensor(rows, dtype=torch.float32), _mask(bits), sample="calib[7]")
    assert "calib[7]" in str(err.value)
    with pytest.raises(AtvSparseError, match="calib\\[7\\]"):  # amia_select reports the same
        amia_select(torch.tensor(rows, dtype=torch.float32), torch.full((4,), 0.25), _mask(bits),
                    sample="calib[7]")


# ---------------------------------------------------------------------------------------------
# AMIA: hand cases
# ---------------------------------------------------------------------------------------------


def test_neighbours_exclude_self_and_break_ties_low():
    # repeated tokens: rows 0, 1 identical (D = 0), row 2 identical too; 3, 4 farther
    dist = torch.tensor([
        [0.0, 0.0, 0.0, 0.5, 0.5],
        [0.0, 0.0, 0.0, 0.5, 0.5],
        [0.0, 0.0, 0.0, 0.5, 0.5],
        [0.5, 0.5, 0.5, 0.0, 0.2],
        [0.5, 0.5, 0.5, 0.2, 0.0],
    ])
    assert _neighbours(dist).tolist() == [
        [1, 2, 3],  # i excluded by index (the official top-4-drop-first would keep a copy of i)
        [0, 2, 3],  # ties at 0.5 (3 vs 4) go to the lower index
        [0, 1, 3],
        [4, 0, 1],
        [3, 0, 1],
    ]
    assert _neighbours(dist[:3, :3]).tolist() == [[1, 2], [0, 2], [0, 1]]  # L - 1 < 3: all others
    assert _neighbours(torch.zeros(1, 1)).shape == (1, 0)


@pytest.mark.parametrize("seed", range(6))
def test_neighbour_shortcut_equals_stable_sort(seed):
    # the topk shortcut must pick exactly what a full stable sort picks, ties and inf included
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 4, (40, 25), generator=gen).float() / 4 if seed % 2 else torch.rand(40, 25, generator=gen)
    rows[torch.rand(40, 25, generator=gen) < 0.1] = float("inf")
    for num in (1, 3, 5):
        assert torch.equal(_smallest_stable(rows, num), torch.sort(rows, dim=1, stable=True).indices[:, :num])


def test_amia_hand_case_suppression_and_mmd_stop():
    # Three pairs of identical directions (norms differ; rows are normalised):
    #   rows 0,1 = e1   rows 2,3 = e2   rows 4,5 = e3
    # D = 0 inside a pair, 1 across pairs; Kx = 1 inside, e = exp(-1) across.
    O = torch.stack([E1, 2 * E1, E2, 0.5 * E2, E3, 4 * E3])
    a = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.125, 0.125])
    visual = _mask("vvvttt")
    # rho: m_vv = 1 (only the pair 0-1 is positive), m_ll = 1 (pair 4-5),
    #      m_vl = 1/9 (only 2-3 among the 9 V x L pairs) -> rho = 19/27,
    #      threshold = 0.1 * sqrt(8/27) = 0.05443
    assert modality_similarity(O, visual).rho == pytest.approx(19 / 27)
    threshold = 0.1 * math.sqrt(8 / 27)
    # neighbours (the pair mate, then the two lowest-index rows at D = 1):
    #   N(0)=[1,2,3] N(1)=[0,2,3] N(2)=[3,0,1] N(3)=[2,0,1] N(4)=[5,0,1] N(5)=[4,0,1]
    # g = a_i + sum exp(-D) a_n:
    #   g0 = g1 = 0 + e*(.25 + .5) = .27591    g2 = .25 + .5 = .75    g3 = .5 + .25 = .75
    #   g4 = g5 = .125 + .125 = .25
    # step 1: argmax tie 2/3 -> 2; suppress N(2) by g2 = .75: g3 -= 1 * .75 -> 0,
    #         g0 = g1 -= exp(-.2) * .75 -> -.33814; S = {2}
    #         MMD^2 = mean K + 1 - 2 mean K[:, 2] = (1 + 2e)/3 + 1 - 2(2 + 4e)/6 = (2 - 2e)/3 = .4214
    # step 2: argmax tie 4/5 -> 4 (2 now holds min - 1); suppress N(4) by .25: g5 -> 0,
    #         g0 = g1 -> -.54282; S = {2, 4}; MMD^2 = (1 - e)/6 = .10535
    # step 3: g3 = g5 = 0 tie -> 3 (the mate of 2: 0 and 1 were suppressed below 0);
    #         max(g3, 0) = 0 suppresses nothing; S = {2, 4, 3}; MMD^2 = (2 - 2e)/9 = .07024
    # step 4: 5; S = {2, 3, 4, 5}; MMD^2 = (1 - e)/6 = .10535 (not monotone)
    # step 5: tie 0/1 -> 0; S = {0, 2, 3, 4, 5}; MMD^2 = (2 - 2e)/75 = .01686 < .05443: stop
    mmd = [(2 - 2 * E) / 3, (1 - E) / 6, (2 - 2 * E) / 9, (1 - E) / 6, (2 - 2 * E) / 75]
    assert [m < threshold for m in mmd] == [False, False, False, False, True]
    sel = amia_select(O, a, visual)
    assert sel.dtype == torch.long
    assert sel.tolist() == [2, 4, 3, 5, 0]
    kernel = literal_kernel(F.normalize(O, dim=-1).double())
    for m, expected in enumerate(mmd, start=1):
        assert literal_mmd2(kernel, sel.tolist()[:m]) == pytest.approx(expected, abs=1e-7)
    assert literal_amia(O, a, visual) == [2, 4, 3, 5, 0]


def test_amia_hand_case_one_direction_selects_everything():
    # Every row points along e1: rho = (1 + 1 + 1)/3 = 1, threshold 0.1 * sqrt(0) = 0, and
    # MMD^2 = 1 + 1 - 2 = 0 is never < 0: the loop ends only when S holds every position.
    O = torch.stack([c * E1 for c in (1.0, 2.0, 4.0, 0.5, 8.0)])
    a = torch.tensor([0.0625, 0.125, 0.25, 0.5, 0.0625])
    visual = _mask("vvttt")
    # D = 0 everywhere; N(0)=[1,2,3] N(1)=[0,2,3] N(2)=[0,1,3] N(3)=[0,1,2] N(4)=[0,1,2]
    # g0..g3 = a_0 + a_1 + a_2 + a_3 = .9375 (each is a_i plus the other three), g4 = .0625 +
    #   .0625 + .125 + .25 = .5
    # step 1: tie 0..3 -> 0; suppress 1, 2, 3 by .9375 -> 0 each; g0 = min - 1 = -1
    # step 2: 4 (.5); suppress 0 (in S; the reset overrides), 1, 2 by .5 -> -.5 each
    # step 3: 3 (0); max(0, 0) = 0 suppresses nothing
    # step 4: tie 1/2 at -.5 -> 1; max(-.5, 0) = 0 suppresses nothing;  step 5: 2
    assert modality_similarity(O, visual).rho == 1.0
    assert amia_select(O, a, visual).tolist() == [0, 4, 3, 1, 2]
    assert literal_amia(O, a, visual) == [0, 4, 3, 1, 2]


def test_amia_stop_after_first_addition():
    # Two pairs, visual = {0, 1} (e1-ish), text = {2, 3} (e2-ish), but row 1 and row 3 sit in
    # the middle: MMD^2 of the single middle row is small enough to stop at once.
    mid = F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    O = torch.stack([torch.tensor([1.0, 0.2, 0.0]), mid, torch.tensor([0.2, 1.0, 0.0]), mid])
    a = torch.tensor([0.1, 0.4, 0.1, 0.4])
    visual = _mask("vvtt")
    unit = F.normalize(O, dim=-1).double()
    threshold = 0.1 * math.sqrt(1 - literal_rho(unit, visual))
    # g1 = g3 (same row, same neighbours by symmetry) but the tie goes to the lower index, 1
    sel = amia_select(O, a, visual)
    assert sel.tolist() == literal_amia(O, a, visual)
    assert sel.tolist()[0] == 1
    assert literal_mmd2(literal_kernel(unit), [1]) < threshold
    assert sel.tolist() == [1]


def test_amia_rejects_bad_shapes():
    O = torch.randn(6, 4)
    with pytest.raises(AtvSparseError, match="attention"):
        amia_select(O, torch.rand(5), _mask("vvvttt"))
    with pytest.raises(AtvSparseError, match="visual mask"):
        amia_select(O, torch.rand(6), torch.ones(6))
    with pytest.raises(AtvSparseError, match="NaN"):
        amia_select(O, torch.tensor([0.1, float("nan"), 0, 0, 0, 0]), _mask("vvvttt"))


# ---------------------------------------------------------------------------------------------
# AMIA: random data against the literal transcription
# ---------------------------------------------------------------------------------------------


def _random_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    length = int(torch.randint(6, 70, (1,), generator=gen))
    dim = int(torch.randint(3, 24, (1,), generator=gen))
    clusters = int(torch.randint(1, 6, (1,), generator=gen))
    centres = torch.randn(clusters, dim, generator=gen) + 0.5  # shared offset: positive cosines
    spread = float(torch.rand(1, generator=gen)) * 1.5
    O = centres[torch.randint(0, clusters, (length,), generator=gen)]
    O = O + spread * torch.randn(length, dim, generator=gen)
    if seed % 3 == 0:  # exact repeated tokens
        O[1::4] = O[0::4][: O[1::4].shape[0]]
    O = O * torch.rand(length, 1, generator=gen).add(0.1)  # norms do not matter
    a = torch.softmax(3 * torch.randn(length, generator=gen), 0)
    visual = torch.rand(length, generator=gen) < 0.6
    visual[:2], visual[2:4] = True, False
    return O.to(torch.float16 if seed % 4 == 1 else torch.float32), a, visual


@pytest.mark.parametrize("seed", range(40))
def test_amia_random_matches_literal_and_stops_at_first_hit(seed):
    O, a, visual = _random_case(seed)
    sel = amia_select(O, a, visual, sample=f"s{seed}").tolist()
    assert sel == literal_amia(O, a, visual)
    length = O.shape[0]
    assert len(set(sel)) == len(sel) and all(0 <= i < length for i in sel)
    unit = F.normalize(O.float(), dim=-1).double()
    kernel = literal_kernel(unit)
    threshold = 0.1 * math.sqrt(max(1 - literal_rho(unit, visual), 0.0))
    mmd = [literal_mmd2(kernel, sel[:m]) for m in range(1, len(sel) + 1)]
    assert all(v >= threshold for v in mmd[:-1])  # not before
    assert mmd[-1] < threshold or len(sel) == length  # at the stop


@pytest.mark.parametrize("first_check", [1, 2, 3, 16])
@pytest.mark.parametrize("seed", [7, 8, 9, 10])
def test_amia_mmd_checkpoints_do_not_change_the_stop(monkeypatch, seed, first_check):
    # the MMD is checked on prefixes of sizes first_check, 2x, 4x, ..., L: any schedule must give
    # the same S (the greedy order does not depend on where the checks fall)
    from atv_sparse.prune import tamp

    O, a, visual = _random_case(seed)
    expected = literal_amia(O, a, visual)
    monkeypatch.setattr(tamp, "_FIRST_MMD_CHECK", first_check)
    assert amia_select(O, a, visual).tolist() == expected


def test_amia_long_sequences():
    gen = torch.Generator().manual_seed(123)
    length = 300
    O = torch.randn(length, 32, generator=gen) + 0.05
    a = torch.softmax(torch.randn(length, generator=gen), 0)
    visual = torch.arange(length) < 200
    assert amia_select(O, a, visual).tolist() == literal_amia(O, a, visual)
    # one direction for all 40 rows (rho = 1): every position, through checks at 16, 32, 40
    # (power-of-two norms keep the normalised rows bit-identical, so rho is exactly 1; with
    # other norms rounding leaves rho a hair below 1 and the tiny threshold stops at once)
    O = torch.pow(2.0, torch.randint(-3, 4, (40, 1), generator=gen).float()) * E2
    a = torch.softmax(torch.randn(40, generator=gen), 0)
    sel = amia_select(O, a, torch.arange(40) < 20).tolist()
    assert sorted(sel) == list(range(40))
    assert sel == literal_amia(O, a, torch.arange(40) < 20)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def test_tamp_stats_running_mean_over_tokens():
    gen = torch.Generator().manual_seed(5)
    x1 = torch.randn(7, 6, generator=gen)
    x2 = torch.randn(9, 6, generator=gen).half()
    sel1 = torch.tensor([4, 0, 2])
    sel2 = torch.zeros(9, dtype=torch.bool)
    sel2[[1, 3, 5, 6, 8]] = True
    stats = TampStats(6)
    stats.update(x1, sel1)
    stats.update(x2, sel2)
    assert stats.nsamples == stats.ntokens == 8  # tokens, not sequences
    # DESIGN: r <- r n/(n+|S|) + sum_S x^2/(n+|S|): the mean of x^2 over the 8 selected tokens
    rows = torch.cat([x1[sel1], x2[sel2].float()])
    torch.testing.assert_close(stats.scaler_row, (rows * rows).mean(0), rtol=1e-6, atol=0)
    # bit-exact against the documented evaluation order
    r = torch.zeros(6)
    r *= 0 / 3
    r += torch.norm(x1[sel1].t().float(), p=2, dim=1) ** 2 / 3
    r *= 3 / 8
    r += torch.norm(x2[sel2].t().float(), p=2, dim=1) ** 2 / 8
    assert torch.equal(stats.scaler_row, r)
    # the Wanda score takes it as is
    w = torch.randn(3, 6, generator=gen)
    assert torch.equal(wanda_score(w, stats), w.abs() * r.sqrt()[None])


def test_tamp_update_functional_and_empty_selection():
    r = torch.zeros(4)
    r, n = tamp_update(r, 0, torch.zeros(0, 4))
    assert n == 0 and torch.equal(r, torch.zeros(4))
    r, n = tamp_update(r, 0, torch.tensor([[1.0, 2.0, 0.0, 3.0]]))
    r, n = tamp_update(r, n, torch.tensor([[3.0, 0.0, 0.0, 1.0], [2.0, 2.0, 1.0, 1.0]]))
    assert n == 3
    # mean of x^2 over the 3 tokens: (1 + 9 + 4, 4 + 0 + 4, 0 + 0 + 1, 9 + 1 + 1) / 3
    torch.testing.assert_close(r, torch.tensor([14 / 3, 8 / 3, 1 / 3, 11 / 3]), rtol=1e-6, atol=0)
    with pytest.raises(AtvSparseError):
        tamp_update(r, n, torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------------
# DAS
# ---------------------------------------------------------------------------------------------


def test_das_exact_hand_case():
    numels = {"a": 100, "b": 200, "c": 100}
    scores = {"a": 1.0, "b": 1.0, "c": 2.0}
    # P = 400, s = .5: keep_tot = 200; s_max = .6: floors ceil(n * .4) = 40, 80, 40 (sum 160)
    # R = 40, sum(score) = 4: a += ceil(.25 * 40) = 10, b += 10, c += ceil(.5 * 40) = 20
    # -> 50, 90, 60 = 200 exactly
    keep = das_keep_counts(scores, numels, 0.5)
    assert keep == {"a": 50, "b": 90, "c": 60}
    assert das_allocation(scores, numels, 0.5) == {"a": 0.5, "b": 1 - 90 / 200, "c": 0.4}


def test_das_overshoot_taken_from_the_largest_keep():
    numels = {"a": 100, "b": 200, "c": 100}
    scores = {"a": 1.0, "b": 1.0, "c": 1.0}
    # floors 40, 80, 40; R = 40: each += ceil(40 / 3) = 14 -> 54, 94, 54 = 202, 2 over:
    # removed from b (largest keep), 94 -> 92
    keep = das_keep_counts(scores, numels, 0.5)
    assert keep == {"a": 54, "b": 92, "c": 54}
    assert sum(keep.values()) == 200


def test_das_overshoot_spills_to_next_layer_at_the_floor():
    # floor of the largest layer reached: the rest of the excess comes off the next one
    numels = {"a": 10, "b": 10, "c": 10}
    scores = {"a": 1.0, "b": 1.0, "c": 1.0}
    # s = .75: keep_tot = int(.25 * 30) = 7; s_max = .85: floors ceil(10 * .15) = 2 each (6)
    # R = 1: each += ceil(1/3) = 1 -> 3, 3, 3 = 9, 2 over: a 3 -> 2 (floor), b 3 -> 2
    assert das_keep_counts(scores, numels, 0.75) == {"a": 2, "b": 2, "c": 3}


def test_das_full_layer_clamped_and_score_zeroed():
    numels = {"small": 10, "big": 1000}
    scores = {"small": 10.0, "big": 1.0}
    # P = 1010, s = .5: keep_tot = 505; floors 4, 400; R = 101:
    # small += ceil(10/11 * 101) = 92 -> 96 >= 10: clamp to 10, score 0;
    # big += ceil(1/11 * 101) = 10 -> 410; sum 420; R = 85: big += 85 -> 495; sum 505
    keep = das_keep_counts(scores, numels, 0.5)
    assert keep == {"small": 10, "big": 495}
    assert das_allocation(scores, numels, 0.5) == {"small": 0.0, "big": 1 - 495 / 1000}


def test_das_all_scores_zero_does_not_loop():
    numels = {"a": 100, "b": 300}
    # zero scores from the start: the remainder R = 200 - 160 = 40 is spread by free room
    # (60, 180): a += ceil(60/240 * 40) = 10, b += 30
    assert das_keep_counts({"a": 0.0, "b": 0.0}, numels, 0.5) == {"a": 50, "b": 150}
    # a fills up (its score becomes 0), b scored exactly 0
    numels = {"a": 10, "b": 100}
    # keep_tot = 55; floors 4, 40; R = 11: a -> 10 (clamped); sum 50; remaining 5 by room -> b 45
    assert das_keep_counts({"a": 1.0, "b": 0.0}, numels, 0.5) == {"a": 10, "b": 45}


def test_das_zero_sparsity_keeps_everything():
    numels = {"a": 7, "b": 13, "c": 29}
    keep = das_keep_counts({"a": 0.3, "b": 0.1, "c": 0.0}, numels, 0.0)
    assert keep == numels
    assert set(das_allocation({"a": 0.3, "b": 0.1, "c": 0.0}, numels, 0.0).values()) == {0.0}


@pytest.mark.parametrize("seed", range(30))
def test_das_random_invariants(seed):
    gen = torch.Generator().manual_seed(seed)
    layers = int(torch.randint(1, 12, (1,), generator=gen))
    numels = {f"l{i}": int(torch.randint(500, 5000, (1,), generator=gen)) for i in range(layers)}
    scores = {k: float(torch.rand(1, generator=gen)) * 2 for k in numels}
    if seed % 5 == 0:
        scores[next(iter(scores))] = 0.0
    sparsity = [0.3, 0.5, 0.6, 0.7, 0.95][seed % 5]
    keep = das_keep_counts(scores, numels, sparsity)
    total = sum(numels.values())
    assert list(keep) == list(numels)
    assert sum(keep.values()) == int((1 - sparsity) * total)
    for k, n in numels.items():
        assert max(math.ceil(n * (1 - (sparsity + 0.1))), 0) <= keep[k] <= n
        assert isinstance(keep[k], int)
    alloc = das_allocation(scores, numels, sparsity)
    assert all(alloc[k] == 1 - keep[k] / numels[k] for k in numels)


def test_das_errors():
    with pytest.raises(AtvSparseError, match="floors"):
        # keep_tot = int(.5 * 3) = 1 but the floor is ceil(3 * .4) = 2
        das_keep_counts({"a": 1.0}, {"a": 3}, 0.5)
    with pytest.raises(AtvSparseError, match="different layers"):
        das_keep_counts({"a": 1.0}, {"b": 100}, 0.5)
    with pytest.raises(AtvSparseError, match="sparsity"):
        das_keep_counts({"a": 1.0}, {"a": 100}, 1.0)
    with pytest.raises(AtvSparseError, match="non-finite"):
        das_keep_counts({"a": float("nan")}, {"a": 100}, 0.5)
