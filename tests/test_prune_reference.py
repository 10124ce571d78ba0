"""Reference tests for ``atv_sparse.prune`` against the literal oracles in
``reference_pruners.py`` (wanda @8e8fc87 / IST-DASLab sparsegpt semantics).

Masks must match exactly, Wanda/SparseGPT statistics bit-exactly, SparseGPT weights
within rtol 1e-4 / atol 1e-5 (fp32) or one ulp of the weight dtype (fp16 / bf16).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

try:  # tests/ on sys.path (pytest "prepend" mode without __init__.py)
    import reference_pruners as R
except ImportError:  # pragma: no cover - tests/ as a package
    from tests import reference_pruners as R

try:
    import atv_sparse.prune as P
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - reported by the fixture below
    P = None
    _IMPORT_ERROR = exc


@pytest.fixture
def prune():
    if P is None:
        pytest.fail(f"cannot import atv_sparse.prune: {_IMPORT_ERROR!r}")
    return P


def _pattern(sparsity: float | None = None, n: int | None = None, m: int | None = None):
    """The reference's mask arguments (``sparsity``, or ``n`` and ``m``) as the ``Pattern`` ours take."""
    from atv_sparse.patterns import parse_pattern

    return parse_pattern(f"{n}:{m}") if m is not None else parse_pattern("unstructured", sparsity)


DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

NM_PATTERNS = [
    pytest.param((2, 4), id="2of4"),
    pytest.param((4, 8), id="4of8"),
    pytest.param((1, 4), id="1of4"),
    pytest.param((3, 8), id="3of8"),
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seed_of(*parts) -> int:
    """Deterministic per-case seed (str hash is salted per process, so no hash())."""
    s = "|".join(str(p) for p in parts)
    return sum((i + 1) * ord(c) for i, c in enumerate(s)) % (2**31 - 1)


def _randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _tie_scores(shape, dtype, g):
    """Scores from a tiny integer set -> many exact ties."""
    return torch.randint(0, 3, shape, generator=g).to(dtype)


def _tie_weights(shape, dtype, g):
    """Weights from a small set of values (incl. 0 and +-x pairs) -> ties in |W|."""
    vals = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    idx = torch.randint(0, len(vals), shape, generator=g)
    return vals[idx].to(dtype)


def _distinct_weights(shape, dtype, g):
    """Weights whose magnitudes are pairwise distinct (consecutive bit patterns,
    randomly permuted), with random signs: tie-free |W| in any dtype."""
    numel = shape[0] * shape[1]
    perm = torch.randperm(numel, generator=g)
    if dtype == torch.float32:
        mags = (perm.to(torch.int32) + 0x3E000000).view(torch.float32)
    elif dtype == torch.float16:
        mags = (perm.to(torch.int16) + 0x2000).view(torch.float16)
    elif dtype == torch.bfloat16:
        mags = (perm.to(torch.int16) + 0x3000).view(torch.bfloat16)
    else:  # pragma: no cover
        raise AssertionError(dtype)
    sign = torch.randint(0, 2, (numel,), generator=g).to(dtype) * 2 - 1
    w = (mags * sign).reshape(shape)
    assert torch.unique(w.abs()).numel() == numel
    return w


def _assert_mask_equal(actual, expected, what="mask"):
    __tracebackhide__ = True
    assert isinstance(actual, torch.Tensor), f"{what}: not a tensor ({type(actual)})"
    assert actual.dtype == torch.bool, f"{what}: dtype {actual.dtype}, expected torch.bool"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        diff = (actual != expected).nonzero().tolist()
        raise AssertionError(
            f"{what}: {len(diff)} of {expected.numel()} entries differ from the reference; "
            f"first (row, col): {diff[:10]}"
        )


def _assert_nm_counts(keep, n, m):
    __tracebackhide__ = True
    rows, cols = keep.shape
    per_group = keep.reshape(rows, cols // m, m).sum(-1)
    assert torch.all(per_group == n), f"some groups do not keep exactly {n} of {m}: {per_group.unique().tolist()}"


def _ordinal16(x: torch.Tensor) -> torch.Tensor:
    """Monotone integer ordinal of a 16-bit float (sign-magnitude -> two's complement);
    +0 and -0 both map to 0. Adjacent representable values differ by 1."""
    b = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(b < 0, -(b + 32768), b)


def _assert_within_one_ulp(actual, ref_fp32, dtype, what="weight"):
    __tracebackhide__ = True
    assert actual.dtype == dtype
    expected = ref_fp32.to(dtype)
    dist = (_ordinal16(actual) - _ordinal16(expected)).abs()
    if int(dist.max()) > 1:
        bad = (dist > 1).nonzero()[:5].tolist()
        detail = [(r, c, float(actual[r, c]), float(expected[r, c]), float(ref_fp32[r, c])) for r, c in bad]
        raise AssertionError(
            f"{what}: {int((dist > 1).sum())} entries more than 1 ulp ({dtype}) from the reference "
            f"(max {int(dist.max())} ulp); (row, col, actual, expected, ref_fp32): {detail}"
        )


def _calibration_batches(in_features, g, dead_cols=(), dtype=torch.float32, dup_pairs=False):
    """A few calibration inputs of varied shape (3-D and 2-D), per-column scales."""
    col_scale = torch.rand(in_features, generator=g) * 2 + 0.1
    shapes = [(4, 40), (30,), (2, 25), (1, 16)]
    out = []
    for sh in shapes:
        x = torch.randn(*sh, in_features, generator=g) * col_scale
        if dup_pairs:
            x[..., 1::2] = x[..., 0::2]
        if len(dead_cols):
            x[..., list(dead_cols)] = 0
        out.append(x.to(dtype))
    return out


def _dead_cols(in_features, g):
    """A contiguous run covering a whole group of 8 at column 8, plus scattered ones."""
    scattered = torch.randperm(in_features - 16, generator=g)[:5] + 16
    return sorted(set(range(8, 16)) | set(scattered.tolist()))


# ===========================================================================
# 0. Sanity checks of the oracle itself (run even without the implementation)
# ===========================================================================


@pytest.mark.parametrize("nm", NM_PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_oracle_nm_keeps_n_per_group(nm, dtype):
    n, m = nm
    g = _gen(_seed_of("oracle_nm", n, m, dtype))
    score = _randn((24, 136), dtype, g).abs()
    keep = R.ref_nm_keep(score, n, m)
    _assert_nm_counts(keep, n, m)
    if torch.unique(score.float()).numel() == score.numel():
        _assert_mask_equal(keep, R.py_nm_keep_tiefree(score, n, m), "oracle vs python")
    # kept entries are the n largest of their group
    grp = score.float().reshape(24, -1, m)
    kg = keep.reshape(24, -1, m)
    kept_min = torch.where(kg, grp, torch.full_like(grp, math.inf)).amin(-1)
    pruned_max = torch.where(~kg, grp, torch.full_like(grp, -math.inf)).amax(-1)
    assert torch.all(kept_min >= pruned_max)
    ties = _tie_scores((24, 136), dtype, g)
    _assert_nm_counts(R.ref_nm_keep(ties, n, m), n, m)
    with pytest.raises(ValueError):
        R.ref_nm_keep(score[:, :-2], n, m)


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.57, 0.6, 0.7])
@pytest.mark.parametrize("ties", [False, True], ids=["randn", "ties"])
def test_oracle_unstructured(sparsity, ties):
    g = _gen(_seed_of("oracle_unstr", sparsity, ties))
    score = _tie_scores((16, 100), torch.float32, g) if ties else _randn((16, 100), torch.float32, g)
    keep = R.ref_unstructured_keep(score, sparsity)
    assert torch.all((~keep).sum(1) == int(100 * sparsity))
    _assert_mask_equal(keep, R.py_unstructured_keep(score, sparsity), "oracle vs python stable sort")


def test_oracle_sparsity_truncation():
    # the traps the design document calls out
    assert int(100 * 0.29) == 28
    assert int(100 * 0.57) == 56
    assert int(200 * 0.29) == 57


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_oracle_magnitude_count(sparsity):
    g = _gen(_seed_of("oracle_mag", sparsity))
    w = _distinct_weights((32, 72), torch.float32, g)
    keep = R.ref_magnitude_keep(w, sparsity=sparsity)
    assert int((~keep).sum()) == int(w.numel() * sparsity) + 1


def test_oracle_stats_closed_form():
    """r == sum_tokens x^2 / total_sequences and H == 2/N X^T X (up to rounding)."""
    g = _gen(11)
    batches = _calibration_batches(72, g)
    ws, hs = R.RefWandaStats(72), R.RefHessianStats(72)
    for x in batches:
        ws.add_batch(x)
        hs.add_batch(x)
    N = sum(1 if x.dim() == 2 else x.shape[0] for x in batches)
    assert ws.nsamples == N and hs.nsamples == N
    X = torch.cat([x.reshape(-1, 72) for x in batches]).double()
    torch.testing.assert_close(ws.scaler_row.double(), (X ** 2).sum(0) / N, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.H.double(), 2 * X.T @ X / N, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["unstr0.5", "2of4"])
def test_oracle_sparsegpt_beats_plain_masking(mode):
    """The OBS update must reduce the layer output error vs. just zeroing the same
    weights; pruned entries are zeros; the hessian argument is untouched."""
    g = _gen(_seed_of("oracle_sgpt", mode))
    in_f, out_f = 136, 24
    batches = _calibration_batches(in_f, g)
    hs = R.RefHessianStats(in_f)
    for x in batches:
        hs.add_batch(x)
    H0 = hs.H.clone()
    w = _randn((out_f, in_f), torch.float32, g)
    kw = dict(sparsity=0.5) if mode == "unstr0.5" else dict(n=2, m=4)
    W, keep = R.ref_sparsegpt_prune(w, hs.H, blocksize=64, **kw)
    assert torch.equal(hs.H, H0)
    assert torch.all(W[~keep] == 0)
    if mode == "2of4":
        _assert_nm_counts(keep, 2, 4)
    else:
        frac = float((~keep).float().mean())
        assert 0.45 < frac < 0.55
    X = torch.cat([x.reshape(-1, in_f) for x in batches])
    err_obs = (X @ (w - W).T).pow(2).sum()
    err_mask = (X @ (w * (~keep)).sub(w).T).pow(2).sum()
    assert err_obs < err_mask


# ===========================================================================
# 1. nm_mask
# ===========================================================================

NM_SHAPES = [
    pytest.param((16, 72), id="16x72"),
    pytest.param((32, 136), id="32x136"),
    pytest.param((24, 264), id="24x264"),
]


@pytest.mark.parametrize("shape", NM_SHAPES)
@pytest.mark.parametrize("data", ["randn", "ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", NM_PATTERNS)
def test_nm_mask_matches_reference(prune, nm, dtype, data, shape):
    n, m = nm
    g = _gen(_seed_of("nm", n, m, dtype, data, shape))
    if data == "ties":
        score = _tie_scores(shape, dtype, g)
    else:
        score = _randn(shape, dtype, g)  # signed scores are fine for the mask function
    score_before = score.clone()
    expected = R.ref_nm_keep(score, n, m)
    keep = prune.nm_mask(score, n, m)
    _assert_mask_equal(keep, expected, f"nm_mask {n}:{m}")
    _assert_nm_counts(keep, n, m)
    assert torch.equal(score, score_before), "nm_mask modified its input"


@pytest.mark.parametrize(
    "nm,in_features",
    [((2, 4), 70), ((2, 4), 6), ((4, 8), 68), ((3, 8), 100), ((1, 4), 135)],
    ids=["2of4-in70", "2of4-in6", "4of8-in68", "3of8-in100", "1of4-in135"],
)
def test_nm_mask_rejects_in_not_multiple_of_m(prune, nm, in_features):
    n, m = nm
    score = torch.rand(8, in_features, generator=_gen(3))
    with pytest.raises(ValueError):
        prune.nm_mask(score, n, m)


# ===========================================================================
# 2. unstructured_mask
# ===========================================================================

UNSTR_SPARSITIES = [0.0, 0.29, 0.5, 0.57, 0.6, 0.7]
UNSTR_SHAPES = [
    pytest.param((16, 100), id="16x100"),
    pytest.param((32, 72), id="32x72"),
    pytest.param((24, 200), id="24x200"),
]


@pytest.mark.parametrize("shape", UNSTR_SHAPES)
@pytest.mark.parametrize("data", ["randn", "ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", UNSTR_SPARSITIES, ids=[f"s{s}" for s in UNSTR_SPARSITIES])
def test_unstructured_mask_matches_reference(prune, sparsity, dtype, data, shape):
    rows, cols = shape
    g = _gen(_seed_of("unstr", sparsity, dtype, data, shape))
    score = _tie_scores(shape, dtype, g) if data == "ties" else _randn(shape, dtype, g).abs()
    score_before = score.clone()
    expected = R.ref_unstructured_keep(score, sparsity)
    keep = prune.unstructured_mask(score, sparsity)
    _assert_mask_equal(keep, expected, f"unstructured_mask s={sparsity}")
    assert torch.all((~keep).sum(1) == int(cols * sparsity)), "every row must prune exactly int(in*s)"
    assert torch.equal(score, score_before), "unstructured_mask modified its input"


# ===========================================================================
# 3. WandaStats / wanda_score / Wanda masks
# ===========================================================================


def _stats_sequences(in_features, dtype, g, dead=()):
    """(list of inputs) with mixed 2-D / 3-D inputs and varied B, T."""
    col_scale = torch.rand(in_features, generator=g) * 3 + 0.05
    shapes = [(2, 8), (5,), (3, 5), (1, 16), (12,), (4, 3)]
    xs = []
    for sh in shapes:
        x = torch.randn(*sh, in_features, generator=g) * col_scale
        if len(dead):
            x[..., list(dead)] = 0
        xs.append(x.to(dtype))
    return xs


STATS_CASES = [
    pytest.param(72, torch.float32, False, id="in72-fp32"),
    pytest.param(200, torch.float32, True, id="in200-fp32-dead"),
    pytest.param(136, torch.float16, False, id="in136-fp16"),
    pytest.param(100, torch.float16, True, id="in100-fp16-dead"),
    pytest.param(72, torch.bfloat16, True, id="in72-bf16-dead"),
    pytest.param(200, torch.bfloat16, False, id="in200-bf16"),
]


def test_wanda_stats_initial_state(prune):
    s = prune.WandaStats(72)
    assert s.nsamples == 0
    assert s.scaler_row.dtype == torch.float32 and tuple(s.scaler_row.shape) == (72,)
    assert torch.all(s.scaler_row == 0)


@pytest.mark.parametrize("in_features,dtype,dead", STATS_CASES)
def test_wanda_stats_bitexact(prune, in_features, dtype, dead):
    g = _gen(_seed_of("wstats", in_features, dtype, dead))
    dead_cols = _dead_cols(in_features, g) if dead else ()
    xs = _stats_sequences(in_features, dtype, g, dead_cols)
    ref = R.RefWandaStats(in_features)
    impl = prune.WandaStats(in_features)
    for k, x in enumerate(xs):
        x_before = x.clone()
        ref.add_batch(x)
        impl.update(x)
        assert torch.equal(x, x_before), "WandaStats.update modified its input"
        assert isinstance(impl.nsamples, int) and impl.nsamples == ref.nsamples, (
            f"after update {k}: nsamples {impl.nsamples!r} != {ref.nsamples}")
        assert impl.scaler_row.dtype == torch.float32
        assert tuple(impl.scaler_row.shape) == (in_features,)
        if not torch.equal(impl.scaler_row, ref.scaler_row):
            d = (impl.scaler_row - ref.scaler_row).abs().max().item()
            raise AssertionError(f"after update {k} (input shape {tuple(x.shape)}): scaler_row not "
                                 f"bit-exact with the reference (max abs diff {d:g})")
    if dead:
        assert torch.all(impl.scaler_row[dead_cols] == 0)


@pytest.mark.parametrize("pass_tensor", [False, True], ids=["stats", "scaler_row"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wanda_score_bitexact(prune, dtype, pass_tensor):
    g = _gen(_seed_of("wscore", dtype, pass_tensor))
    in_f = 136
    dead_cols = _dead_cols(in_f, g)
    ref = R.RefWandaStats(in_f)
    stats = prune.WandaStats(in_f)
    for x in _calibration_batches(in_f, g, dead_cols, dtype=dtype):
        ref.add_batch(x)
        stats.update(x)
    w = _randn((32, in_f), dtype, g)
    w_before = w.clone()
    expected = R.ref_wanda_score(w, ref.scaler_row)
    assert expected.dtype == torch.float32
    score = prune.wanda_score(w, stats.scaler_row if pass_tensor else stats)
    assert score.dtype == torch.float32, f"wanda_score dtype {score.dtype}"
    assert score.shape == w.shape
    assert torch.equal(score, expected), "wanda_score not bit-exact with |W| * sqrt(r)"
    assert torch.equal(w, w_before), "wanda_score modified the weight"


WANDA_MODES = [
    pytest.param(("nm", 2, 4), id="2of4"),
    pytest.param(("nm", 4, 8), id="4of8"),
    pytest.param(("unstr", 0.5, None), id="unstr0.5"),
    pytest.param(("unstr", 0.29, None), id="unstr0.29"),
    pytest.param(("unstr", 0.6, None), id="unstr0.6"),
]


@pytest.mark.parametrize("data", ["randn", "dead", "ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", WANDA_MODES)
def test_wanda_masks_match_reference(prune, mode, dtype, data):
    kind, a, b = mode
    in_f = 136 if kind == "nm" else 100
    out_f = 32
    g = _gen(_seed_of("wmask", mode, dtype, data))
    dead_cols = _dead_cols(in_f, g) if data in ("dead", "ties") else ()
    batches = _calibration_batches(in_f, g, dead_cols, dtype=dtype, dup_pairs=(data == "ties"))
    if data == "ties":
        w = _tie_weights((out_f, in_f), dtype, g)
    else:
        w = _randn((out_f, in_f), dtype, g, scale=0.05)

    ref = R.RefWandaStats(in_f)
    stats = prune.WandaStats(in_f)
    for x in batches:
        ref.add_batch(x)
        stats.update(x)
    ref_score = R.ref_wanda_score(w, ref.scaler_row)
    score = prune.wanda_score(w, stats)
    if kind == "nm":
        expected = R.ref_nm_keep(ref_score, a, b)
        keep = prune.nm_mask(score, a, b)
        _assert_mask_equal(keep, expected, f"wanda {a}:{b} mask")
        _assert_nm_counts(keep, a, b)
    else:
        expected = R.ref_unstructured_keep(ref_score, a)
        keep = prune.unstructured_mask(score, a)
        _assert_mask_equal(keep, expected, f"wanda unstructured s={a} mask")
        assert torch.all((~keep).sum(1) == int(in_f * a))


# ===========================================================================
# 4. magnitude_mask
# ===========================================================================

MAG_SPARSITIES = [0.29, 0.5, 0.6, 0.7]


@pytest.mark.parametrize("shape", [pytest.param((16, 100), id="16x100"), pytest.param((48, 200), id="48x200")])
@pytest.mark.parametrize("data", ["randn", "ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", MAG_SPARSITIES, ids=[f"s{s}" for s in MAG_SPARSITIES])
def test_magnitude_mask_unstructured_matches_reference(prune, sparsity, dtype, data, shape):
    g = _gen(_seed_of("mag_u", sparsity, dtype, data, shape))
    w = _tie_weights(shape, dtype, g) if data == "ties" else _randn(shape, dtype, g, scale=0.02)
    w_before = w.clone()
    expected = R.ref_magnitude_keep(w, sparsity=sparsity)
    keep = prune.magnitude_mask(w, _pattern(sparsity=sparsity))
    _assert_mask_equal(keep, expected, f"magnitude_mask s={sparsity}")
    assert torch.equal(w, w_before), "magnitude_mask modified the weight"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", MAG_SPARSITIES, ids=[f"s{s}" for s in MAG_SPARSITIES])
def test_magnitude_mask_unstructured_count_tiefree(prune, sparsity, dtype):
    shape = (24, 72)
    g = _gen(_seed_of("mag_count", sparsity, dtype))
    w = _distinct_weights(shape, dtype, g)
    keep = prune.magnitude_mask(w, _pattern(sparsity=sparsity))
    _assert_mask_equal(keep, R.ref_magnitude_keep(w, sparsity=sparsity), f"magnitude_mask s={sparsity}")
    assert int((~keep).sum()) == int(w.numel() * sparsity) + 1
    # a single global threshold: every pruned |w| is below every kept |w|
    a = w.float().abs()
    assert a[~keep].max() < a[keep].min()


@pytest.mark.parametrize("shape", [pytest.param((16, 72), id="16x72"), pytest.param((32, 136), id="32x136")])
@pytest.mark.parametrize("data", ["randn", "ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", NM_PATTERNS)
def test_magnitude_mask_nm_matches_reference(prune, nm, dtype, data, shape):
    n, m = nm
    g = _gen(_seed_of("mag_nm", n, m, dtype, data, shape))
    w = _tie_weights(shape, dtype, g) if data == "ties" else _randn(shape, dtype, g, scale=0.02)
    expected = R.ref_magnitude_keep(w, n=n, m=m)
    keep = prune.magnitude_mask(w, _pattern(n=n, m=m))
    _assert_mask_equal(keep, expected, f"magnitude_mask {n}:{m}")
    _assert_nm_counts(keep, n, m)


# ===========================================================================
# 5. HessianStats
# ===========================================================================


def test_hessian_stats_initial_state(prune):
    s = prune.HessianStats(72)
    assert s.nsamples == 0
    assert s.hessian.dtype == torch.float32 and tuple(s.hessian.shape) == (72, 72)
    assert torch.all(s.hessian == 0)


@pytest.mark.parametrize("in_features,dtype,dead", STATS_CASES)
def test_hessian_stats_bitexact(prune, in_features, dtype, dead):
    g = _gen(_seed_of("hstats", in_features, dtype, dead))
    dead_cols = _dead_cols(in_features, g) if dead else ()
    xs = _stats_sequences(in_features, dtype, g, dead_cols)
    ref = R.RefHessianStats(in_features)
    impl = prune.HessianStats(in_features)
    for k, x in enumerate(xs):
        x_before = x.clone()
        ref.add_batch(x)
        impl.update(x)
        assert torch.equal(x, x_before), "HessianStats.update modified its input"
        assert isinstance(impl.nsamples, int) and impl.nsamples == ref.nsamples, (
            f"after update {k}: nsamples {impl.nsamples!r} != {ref.nsamples}")
        assert impl.hessian.dtype == torch.float32
        assert tuple(impl.hessian.shape) == (in_features, in_features)
        if not torch.equal(impl.hessian, ref.H):
            d = (impl.hessian - ref.H).abs().max().item()
            raise AssertionError(f"after update {k} (input shape {tuple(x.shape)}): hessian not "
                                 f"bit-exact with the reference (max abs diff {d:g})")
    if dead:
        assert torch.all(torch.diag(impl.hessian)[dead_cols] == 0)


# ===========================================================================
# 6. sparsegpt_prune
# ===========================================================================

SGPT_MODES = [
    pytest.param(dict(sparsity=0.5), id="unstr0.5"),
    pytest.param(dict(sparsity=0.6), id="unstr0.6"),
    pytest.param(dict(n=2, m=4), id="2of4"),
    pytest.param(dict(n=4, m=8), id="4of8"),
]

# (out, in, blocksize, dead columns, percdamp)
SGPT_CONFIGS = [
    pytest.param((32, 200, 128, False, 0.01), id="in200-bs128"),
    pytest.param((32, 200, 64, True, 0.01), id="in200-bs64-dead"),
    pytest.param((24, 136, 128, True, 0.01), id="in136-bs128-dead"),
    pytest.param((16, 72, 128, False, 0.01), id="in72-bs128"),
    pytest.param((24, 136, 64, True, 0.05), id="in136-bs64-dead-damp0.05"),
]


@pytest.mark.parametrize("config", SGPT_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", SGPT_MODES)
def test_sparsegpt_prune_matches_reference(prune, mode, dtype, config):
    out_f, in_f, blocksize, dead, percdamp = config
    g = _gen(_seed_of("sgpt", sorted(mode.items()), dtype, config))
    dead_cols = _dead_cols(in_f, g) if dead else ()

    hs = R.RefHessianStats(in_f)
    for x in _calibration_batches(in_f, g, dead_cols):
        hs.add_batch(x)
    hessian = hs.H.clone()
    hessian_before = hessian.clone()
    if dead:
        assert torch.all(torch.diag(hessian)[dead_cols] == 0)

    w = _randn((out_f, in_f), dtype, g, scale=0.05)
    w_for_impl = w.clone()

    ref_w32, ref_keep = R.ref_sparsegpt_prune(
        w, hessian, blocksize=blocksize, percdamp=percdamp, **mode)
    assert torch.equal(hessian, hessian_before)  # oracle works on a copy

    result = prune.sparsegpt_prune(w_for_impl, hessian, _pattern(**mode), blocksize=blocksize, percdamp=percdamp)
    assert isinstance(result, tuple) and len(result) == 2
    out, keep = result

    # caller's hessian untouched
    assert torch.equal(hessian, hessian_before), "sparsegpt_prune modified the caller's hessian"

    assert out.dtype == dtype, f"pruned weight dtype {out.dtype}, expected {dtype}"
    assert out.shape == w.shape

    _assert_mask_equal(keep, ref_keep, "sparsegpt keep mask")

    # pruned entries are exact zeros; any nonzero entry is kept
    assert torch.all(out[~keep] == 0), "pruned entries are not exactly zero"
    assert torch.all(keep[out != 0]), "nonzero weight where keep is False"
    if "n" in mode:
        _assert_nm_counts(keep, mode["n"], mode["m"])
    if dead:
        assert torch.all(out[:, dead_cols] == 0), "dead input columns must be zeroed"

    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_w32, rtol=1e-4, atol=1e-5)
    else:
        _assert_within_one_ulp(out, ref_w32, dtype, "sparsegpt weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", [pytest.param((1, 4), id="1of4"), pytest.param((3, 8), id="3of8")])
def test_sparsegpt_prune_nm_keeps_n(prune, nm, dtype):
    """N:M keeps N (design-doc convention: prune M - N), also for patterns where the
    wanda repo's ``topk(..., prune_n)`` convention would differ."""
    n, m = nm
    out_f, in_f, blocksize = 24, 136, 64
    g = _gen(_seed_of("sgpt_nm", n, m, dtype))
    dead_cols = _dead_cols(in_f, g)
    hs = R.RefHessianStats(in_f)
    for x in _calibration_batches(in_f, g, dead_cols):
        hs.add_batch(x)
    hessian = hs.H.clone()
    hessian_before = hessian.clone()
    w = _randn((out_f, in_f), dtype, g, scale=0.05)
    ref_w32, ref_keep = R.ref_sparsegpt_prune(w, hessian, n=n, m=m, blocksize=blocksize)
    out, keep = prune.sparsegpt_prune(w.clone(), hessian, _pattern(n=n, m=m), blocksize=blocksize)
    assert torch.equal(hessian, hessian_before), "sparsegpt_prune modified the caller's hessian"
    assert out.dtype == dtype
    _assert_mask_equal(keep, ref_keep, f"sparsegpt {n}:{m} keep mask")
    _assert_nm_counts(keep, n, m)
    assert torch.all(out[~keep] == 0)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_w32, rtol=1e-4, atol=1e-5)
    else:
        _assert_within_one_ulp(out, ref_w32, dtype, "sparsegpt weight")
