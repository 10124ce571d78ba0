"""TAMP baseline (docs/design.md 4.6): AMIA token selection, token-counted statistics, DAS sparsity.

Pure functions only: the caller (the block driver) computes q / k with RoPE, captures each
linear's input and output rows, and owns the sample loop. Everything here works on one sample
(one sequence, padding already removed) at a time.

Reference: G-JWLee/TAMP @e1dc9d1 (``AdaptiveMultimodalInputActivation`` in
``llava/pruners/wanda_pruner.py``, ``compute_the_sparsity_per_group`` in
``layer_single_base_pruner.py``). Where docs/design.md differs from it on purpose (neighbours exclude
i itself, int64 DAS, overshoot subtracted) docs/design.md is followed.

Public surface:
- ``attention_contribution(q, k, last)``: the per-position attention score a (shared by the
  seven linears of a block).
- ``modality_similarity(O, visual)``: (m_vv, m_ll, m_vl, rho) of one linear's output rows.
- ``amia_select(O, a, visual)``: AMIA's selected positions for one linear and one sample.
- ``TampStats`` / ``tamp_update``: Wanda's r accumulated over selected *tokens*.
- ``das_score``, ``das_keep_counts``, ``das_allocation``: DAS layer-wise sparsity.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import AtvSparseError
from .wanda import WandaStats

# AMIA's constants (official code and docs/design.md 4.6).
NUM_NEIGHBOURS = 3
SUPPRESS_RATE = 0.2  # g_n -= exp(-0.2 * D) * max(g_i*, 0)
MMD_FACTOR = 0.1  # stop when MMD^2 < 0.1 * sqrt(1 - rho)
NORMALIZE_EPS = 1e-12

# The MMD stop is checked on prefixes of the greedy order at these sizes and then at doublings;
# the greedy order does not depend on the MMD, so producing a few positions past the stop is
# harmless (they are discarded) and the O(k^2) prefix sums are paid about once.
_FIRST_MMD_CHECK = 16
# Rows per chunk of the neighbour sort: bounds the (chunk, L) sort buffers to ~16M entries.
_SORT_ENTRIES = 1 << 24


# ---------------------------------------------------------------------------------------------
# attention contribution
# ---------------------------------------------------------------------------------------------


def attention_contribution(q: torch.Tensor, k: torch.Tensor, last: int,
                           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention that the last real position pays to every position, averaged over query heads.

    q: (heads_q, L, d_head), k: (heads_kv, L, d_head), any float dtype: the block's q_proj /
    k_proj outputs (bias included) of its input-normed hidden state, RoPE already applied, one
    sample. heads_q must be a multiple of heads_kv (GQA). last: index of the last non-padding
    position (the query row used). key_mask: optional (L,) bool, False = padding key.
    Returns a: (L,) fp32, ``mean_h softmax(q[h, last] . K_h^T / sqrt(d_head))``; it sums to 1.

    Computed in fp32 (q and k are upcast before the dot product; the official code multiplies
    in the model dtype and upcasts only the softmax). Keys after ``last`` get weight 0: that is
    the causal mask the model applies to that query, and with right padding those keys are the
    padding; for ``last = L - 1`` every one of the L keys takes part, as in docs/design.md.
    GQA: query head h reads kv head ``h // (heads_q // heads_kv)``, the mapping of
    transformers' ``repeat_kv`` (``repeat_interleave`` over the head dim), done here by a reshape
    instead of materialising the repeated keys.
    """
    # The shapes come from the model's own q_proj / k_proj (roped_qk): a mismatch is a bug here.
    assert q.dim() == 3 and k.dim() == 3, f"q and k must be (heads, L, d_head), got {tuple(q.shape)}, {tuple(k.shape)}"
    heads_q, length, d_head = q.shape
    heads_kv = k.shape[0]
    assert k.shape[1:] == (length, d_head) and heads_kv > 0 and heads_q % heads_kv == 0, \
        f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (heads_q must be a multiple of heads_kv)"
    assert 0 <= last < length, f"last={last} is outside 0..{length - 1}"
    rep = heads_q // heads_kv
    # (heads_kv, rep, d) @ (heads_kv, d, L): query head h = g * rep + r pairs with kv head g.
    q_last = q[:, last, :].float().reshape(heads_kv, rep, d_head)
    logits = torch.matmul(q_last, k.float().transpose(1, 2)).reshape(heads_q, length)
    logits = logits / math.sqrt(d_head)
    valid = torch.arange(length, device=q.device) <= last
    if key_mask is not None:
        assert key_mask.shape == (length,) and key_mask.dtype == torch.bool, f"key_mask must be ({length},) bool"
        valid = valid & key_mask.to(q.device)
        if not bool(valid.any()):
            raise AtvSparseError("attention_contribution: key_mask leaves no key at or before `last`")
    logits = logits.masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(dim=0)


# ---------------------------------------------------------------------------------------------
# modality similarity (rho for AMIA, the m's for DAS)
# ---------------------------------------------------------------------------------------------


class ModalitySimilarity(NamedTuple):
    """Mean cosine similarities of one linear's output rows; unpacks as (m_vv, m_ll, m_vl, rho)."""

    m_vv: float
    m_ll: float
    m_vl: float
    rho: float


def _unit_rows(O: torch.Tensor, sample: str) -> torch.Tensor:
    """O: (L, d) any float dtype -> (L, d) fp32 rows of norm 1 (zero rows stay zero)."""
    if O.dim() != 2:
        raise AtvSparseError(f"TAMP: sample {sample}: output rows must be (L, d), got {tuple(O.shape)}")
    unit = F.normalize(O.float(), dim=-1, eps=NORMALIZE_EPS)
    if not bool(torch.isfinite(unit).all()):
        raise AtvSparseError(f"TAMP: sample {sample}: the linear's output rows contain inf or NaN")
    return unit


def _check_visual(visual: torch.Tensor, length: int, sample: str) -> torch.Tensor:
    if visual.shape != (length,) or visual.dtype != torch.bool:
        raise AtvSparseError(f"TAMP: sample {sample}: visual mask must be ({length},) bool, got "
                             f"{tuple(visual.shape)} {visual.dtype}")
    return visual


def _mean_positive_upper(gram: torch.Tensor, which: str, sample: str) -> float:
    """Mean of the strictly positive entries of the strict upper triangle of a square Gram block."""
    upper = torch.triu(gram, diagonal=1)  # the zeroed lower part never counts: 0 is not > 0
    positive = upper[upper > 0]
    if positive.numel() == 0:
        raise AtvSparseError(f"TAMP: sample {sample}: no pair of {which} output rows has a positive "
                             f"cosine similarity, so m_{which[0]}{which[0]} is undefined")
    return positive.sum(dtype=torch.float64).item() / positive.numel()


def _similarity_from_gram(gram: torch.Tensor, visual: torch.Tensor, sample: str) -> ModalitySimilarity:
    """gram: (L, L) fp32 = U U^T of unit rows; visual: (L,) bool on gram's device."""
    text = ~visual
    n_visual, n_text = int(visual.sum()), int(text.sum())
    if n_visual < 2 or n_text < 2:
        raise AtvSparseError(f"TAMP: sample {sample} has {n_visual} visual and {n_text} text "
                             "positions; AMIA / DAS need at least 2 of each (use samples with an "
                             "image and some text)")
    m_vv = _mean_positive_upper(gram[visual][:, visual], "visual", sample)
    m_ll = _mean_positive_upper(gram[text][:, text], "text", sample)
    cross = gram[visual][:, text]
    m_vl = cross.sum(dtype=torch.float64).item() / cross.numel()
    return ModalitySimilarity(m_vv, m_ll, m_vl, (m_vv + m_ll + m_vl) / 3)


def modality_similarity(O: torch.Tensor, visual: torch.Tensor, *, sample: str = "sample") -> ModalitySimilarity:
    """Cosine-similarity summary of one linear's output rows for one sample.

    O: (L, d) any float dtype, the linear's output rows at the sample's non-padding positions
    (padding is neither visual nor text, so the caller drops it); visual: (L,) bool, True at
    image-token positions, every other row is text. sample: names the sample in errors.
    Returns ``ModalitySimilarity(m_vv, m_ll, m_vl, rho)`` as Python floats:
    m_vv / m_ll = mean of the strictly positive entries of the strict upper triangle of
    U_V U_V^T / U_L U_L^T, m_vl = mean of all entries of U_V U_L^T, rho = their mean; U = O's
    rows L2-normalised in fp32 (eps 1e-12). The Gram matrix is fp32; the means accumulate in
    float64. Fewer than 2 visual or 2 text rows, or a triangle without a positive entry, raises
    ``AtvSparseError`` naming the sample.
    """
    unit = _unit_rows(O, sample)
    visual = _check_visual(visual, unit.shape[0], sample).to(unit.device)
    return _similarity_from_gram(unit @ unit.t(), visual, sample)


# ---------------------------------------------------------------------------------------------
# AMIA selection
# ---------------------------------------------------------------------------------------------


def _neighbours(dist: torch.Tensor, num: int = NUM_NEIGHBOURS) -> torch.Tensor:
    """dist: (L, L) fp32. Returns (L, min(num, L - 1)) int64: per row the smallest off-diagonal
    entries in ascending order, equal distances to the lower column (a stable sort).

    i itself is excluded by index, not by value, so repeated tokens (D_ik = 0 for k != i) keep
    their true neighbours (the official code drops the first of the 4 smallest instead).
    """
    length = dist.shape[0]
    num = min(num, length - 1)
    out = torch.empty(length, num, dtype=torch.long, device=dist.device)
    if num <= 0:
        return out
    chunk = max(1, _SORT_ENTRIES // length)
    for start in range(0, length, chunk):
        rows = dist[start:start + chunk].clone()
        idx = torch.arange(rows.shape[0], device=dist.device)
        rows[idx, start + idx] = float("inf")
        out[start:start + chunk] = _smallest_stable(rows, num)
    return out


def _smallest_stable(rows: torch.Tensor, num: int) -> torch.Tensor:
    """(R, L) finite-or-inf fp32 -> (R, num) int64: ``sort(rows, stable=True).indices[:, :num]``.

    A full stable sort of every row is the slow part of AMIA on CPU, so: topk finds the num-th
    smallest value t; a row with exactly num entries <= t has its answer in topk's indices,
    which are put in (value, index) order by an index sort then a stable value sort; rows with
    more entries tied at t (repeated tokens) take the full stable sort.
    """
    values, picked = torch.topk(rows, num, dim=1, largest=False)
    tied = (rows <= values[:, -1:]).sum(dim=1) > num
    picked = picked.sort(dim=1).values
    order = torch.gather(rows, 1, picked).sort(dim=1, stable=True).indices
    picked = torch.gather(picked, 1, order)
    if bool(tied.any()):
        picked[tied] = torch.sort(rows[tied], dim=1, stable=True).indices[:, :num]
    return picked


def _greedy_order(g0: list[float], nbr: list[list[int]], weight: list[list[float]]) -> Iterator[int]:
    """Yield AMIA's positions i* in selection order (all L of them if the caller keeps asking).

    g0: (L,) initial scores g; nbr[i]: N(i); weight[i][j] = exp(-0.2 * D_{i, nbr[i][j]}).
    Python floats (float64).

    The literal loop of docs/design.md 4.6 is, per step: i* = argmax g (first on ties);
    g_n -= exp(-0.2 D_{i*n}) * max(g_{i*}, 0) for n in N(i*); S += {i*}; g_S = min(g) - 1.
    This runs the same loop with a lazy max-heap keyed (-g_i, i), which pops the largest g and,
    among equal g, the lowest i. It selects exactly the same positions because:
    - After every step each member of S holds min(g) - 1, strictly below every unselected entry
      (suppression only lowers entries), so the literal argmax is always the first maximum
      over the *unselected* positions; S's own values never decide anything.
    - g_{i*} in the suppression is read before i* joins S (the spec's order: suppress, add,
      reset). i* is not in N(i*) (neighbours exclude i), so its own suppression cannot change it.
    - Suppressing a neighbour that is already in S changes a value the reset overwrites, so it
      is skipped here; and whether min(g) is taken before or after the suppression only moves
      the (never read) values of S, so the question does not arise.
    - max(g_{i*}, 0) = 0 leaves every g unchanged, so that update is skipped.
    A heap entry is stale when its value no longer equals g_i (values only decrease).
    """
    g = list(g0)
    done = [False] * len(g)
    heap = [(-value, i) for i, value in enumerate(g)]
    heapq.heapify(heap)
    while heap:
        neg, i = heapq.heappop(heap)
        if done[i] or -neg != g[i]:
            continue
        push = max(g[i], 0.0)
        if push > 0.0:
            for n, w in zip(nbr[i], weight[i], strict=True):
                if not done[n]:
                    g[n] -= w * push
                    heapq.heappush(heap, (-g[n], n))
        done[i] = True
        yield i


def _first_mmd_stop(kernel: torch.Tensor, col_sums: torch.Tensor, mean_all: float,
                    order: list[int], threshold: float) -> int | None:
    """Smallest m in 1..len(order) with MMD^2(order[:m]) < threshold, or None.

    kernel: (L, L) fp32 Kx; col_sums: (L,) float64 column sums of Kx; mean_all = mean(Kx).
    MMD^2(S) = mean(Kx) + mean(Kx[S, S]) - 2 mean(Kx[:, S]) for every prefix at once: with
    P = Kx[order][:, order], the block sum of prefix m grows by row m-1 up to the diagonal plus
    column m-1 above it, so cumulative sums of tril row sums and strict-triu column sums give all
    of them (Kx need not be exactly symmetric). Sums accumulate in float64.
    """
    length = kernel.shape[0]
    idx = torch.tensor(order, dtype=torch.long, device=kernel.device)
    block = kernel[idx][:, idx]
    grow = torch.tril(block).sum(dim=1, dtype=torch.float64) + torch.triu(block, 1).sum(dim=0, dtype=torch.float64)
    ss = torch.cumsum(grow, 0)
    xs = torch.cumsum(col_sums[idx], 0)
    m = torch.arange(1, len(order) + 1, dtype=torch.float64, device=kernel.device)
    mmd2 = mean_all + ss / (m * m) - 2.0 * xs / (length * m)
    hits = torch.nonzero(mmd2 < threshold)
    return None if hits.numel() == 0 else int(hits[0, 0]) + 1


def amia_select(O: torch.Tensor, a: torch.Tensor, visual: torch.Tensor, *, sample: str = "sample") -> torch.Tensor:
    """AMIA token selection for one linear layer and one calibration sample (docs/design.md 4.6).

    O: (L, d) any float dtype, the linear's own output rows (before RoPE or activation) at the
    sample's non-padding positions; a: (L,) the attention contribution of those positions
    (``attention_contribution``); visual: (L,) bool image-token mask (selection ranges over text
    and visual positions alike; the mask only enters rho). sample: names the sample in errors.
    Returns S: (|S|,) int64 on O's device, the selected positions in selection order, unique,
    1 <= |S| <= L.

    Steps (U = O's rows L2-normalised in fp32, eps 1e-12):
    - D = 1 - U U^T (fp32); N(i) = the 3 smallest D_ik, k != i, ties to the lower k
      (all other positions when L - 1 < 3).
    - g_i = a_i + sum_{n in N(i)} exp(-D_in) a_n.
    - Greedy (see ``_greedy_order`` for why the heap form equals the literal loop):
      i* = argmax g (first on ties); g_n -= exp(-0.2 D_{i*n}) max(g_{i*}, 0) for n in N(i*);
      S += {i*}; g_S = min(g) - 1.
    - After each addition: stop when MMD^2 < 0.1 sqrt(1 - rho), or when S holds every
      position. Kx_ik = exp(-||u_i - u_k||^2 / 2), diagonals included.
    - rho = ``modality_similarity`` of the same rows and mask (errors as there).

    Precision choices (the spec fixes only "O in fp32"): U, D and Kx are fp32; g and the greedy's
    arithmetic are float64 (from the fp32 D and a); MMD's sums accumulate in float64 and are
    compared with the float64 threshold. 1 - rho is clamped at 0 before the square root (rho
    can round a hair above 1 when every row points the same way; the threshold is then 0 and
    the loop selects every position, as the mathematics says). ||u_i - u_k||^2 is computed as
    |u_i|^2 + |u_k|^2 - 2 u_i.u_k clamped at 0 with an exact 0 on the diagonal, so Kx_ii = 1
    even for an all-zero row (where exp(-D_ii) would give e^-1); on nonzero rows it equals
    exp(-D_ik) to fp32 rounding.
    """
    unit = _unit_rows(O, sample)
    length = unit.shape[0]
    device = unit.device
    visual = _check_visual(visual, length, sample).to(device)
    if a.shape != (length,):
        raise AtvSparseError(f"TAMP: sample {sample}: attention contribution must be ({length},), "
                             f"got {tuple(a.shape)}")
    a = a.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(a).all()):
        raise AtvSparseError(f"TAMP: sample {sample}: the attention contribution contains inf or NaN")

    gram = unit @ unit.t()
    rho = _similarity_from_gram(gram, visual, sample).rho
    threshold = MMD_FACTOR * math.sqrt(max(1.0 - rho, 0.0))

    dist = 1.0 - gram
    nbr = _neighbours(dist)
    nbr_dist = torch.gather(dist, 1, nbr).double()
    g0 = a.double() + (torch.exp(-nbr_dist) * a.double()[nbr]).sum(dim=1)
    weight = torch.exp(-SUPPRESS_RATE * nbr_dist)

    sq_norm = (unit * unit).sum(dim=1)
    sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram).clamp_min_(0.0)
    sq_dist.fill_diagonal_(0.0)
    kernel = torch.exp(-sq_dist / 2.0)
    del sq_dist, dist
    col_sums = kernel.sum(dim=0, dtype=torch.float64)
    mean_all = col_sums.sum().item() / (length * length)

    greedy = _greedy_order(g0.tolist(), nbr.tolist(), weight.tolist())
    order: list[int] = []
    check_at = min(_FIRST_MMD_CHECK, length)
    while True:
        while len(order) < check_at:
            order.append(next(greedy))
        stop = _first_mmd_stop(kernel, col_sums, mean_all, order, threshold)
        if stop is not None:
            del order[stop:]
            break
        if len(order) == length:  # S holds every position
            break
        check_at = min(2 * check_at, length)
    return torch.tensor(order, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def tamp_update(scaler_row: torch.Tensor, ntokens: int, x_selected: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One TAMP statistics update, in place on ``scaler_row``.

    scaler_row: (in,) fp32 r; ntokens: tokens counted so far; x_selected: (m, in) any float
    dtype, the linear's input rows at the selected positions S (m = |S|).
    Returns (scaler_row, ntokens + m).

    ``r <- r * n / (n + m) + sum_{t in S} x_t^2 / (n + m)``, i.e. r stays the mean of x^2 over
    every token counted so far, evaluated as Wanda's update with B replaced by m (the official
    TAMP code's own order of operations): ``r *= n / (n + m)`` (the ratio in Python float, <= 1);
    ``n += m``; ``r += torch.norm(X^T, p=2, dim=1) ** 2 / n`` with X upcast to fp32. Scaling the
    old mean by a ratio <= 1 and adding a new term divided by the new count keeps every
    intermediate the size of the mean itself, so nothing grows with the token count. m = 0 is a
    no-op (and avoids 0 / 0 on the first call).
    """
    if x_selected.dim() != 2 or x_selected.shape[1] != scaler_row.shape[0]:
        raise AtvSparseError(f"TAMP statistics: expected (tokens, {scaler_row.shape[0]}) input rows, "
                             f"got {tuple(x_selected.shape)}")
    count = x_selected.shape[0]
    if count == 0:
        return scaler_row, ntokens
    rows = x_selected.t().to(scaler_row.device).float()
    scaler_row *= ntokens / (ntokens + count)
    ntokens += count
    scaler_row += torch.norm(rows, p=2, dim=1) ** 2 / ntokens
    return scaler_row, ntokens


class TampStats(WandaStats):
    """Per-input-column statistics of one linear layer over AMIA-selected *tokens*.

    ``scaler_row``: (in,) fp32, the mean of x^2 over every selected token so far;
    ``nsamples``: the number of *tokens* counted (unlike ``WandaStats``, whose n counts
    sequences); ``ntokens`` is the same number. A ``WandaStats`` subclass, so ``wanda_score``
    takes it as is: the TAMP score is Wanda's ``|W| * sqrt(r)``.
    """

    @property
    def ntokens(self) -> int:
        return self.nsamples

    def update(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """x: (T, in) or (..., T, in) flattened to rows, any float dtype; positions: optional
        (|S|,) int64 row indices or (T,) bool mask choosing the rows S (None: every row)."""
        rows = x.reshape(-1, x.shape[-1])
        if positions is not None:
            rows = rows[positions.to(rows.device)]
        self.scaler_row, self.nsamples = tamp_update(self.scaler_row, self.nsamples, rows)


# ---------------------------------------------------------------------------------------------
# DAS layer-wise sparsity
# ---------------------------------------------------------------------------------------------

DAS_MAX_EXTRA = 0.1  # s_max = s + 0.1


def das_score(m_vv: float, m_ll: float, m_vl: float) -> float:
    """DAS's layer score from sample-averaged similarities: ``3 - m_vv - m_ll - m_vl``."""
    return 3.0 - m_vv - m_ll - m_vl


def das_keep_counts(scores: dict[str, float], numels: dict[str, int], sparsity: float) -> dict[str, int]:
    """Weights to keep per layer under DAS (docs/design.md 4.6), exact integers summing to keep_tot.

    scores: layer -> ``das_score`` (>= 0; a layer with a higher score keeps more); numels:
    layer -> weight count n_l (same keys); sparsity: the global s, 0 <= s < 1.
    Returns layer -> keep_l (int), in ``numels``' key order, with
    ``sum(keep_l) == keep_tot = int((1 - s) * P)`` and ``floor_l <= keep_l <= n_l``.

    - floor_l = ceil(n_l * (1 - s_max)), s_max = s + 0.1, clamped to [0, n_l]; keep_l = floor_l.
    - While sum keep < keep_tot: R = keep_tot - sum keep; keep_l += ceil(score_l / sum(score) * R)
      (Python float for the ratio, int64 counts); score_l = 0 where keep_l >= n_l; keep_l =
      min(keep_l, n_l). Every pass adds at least 1 to each layer with a positive score (those are
      never full), so the loop ends.
    - Guard: when every score is 0 but keep_tot is not reached (all positive-score layers full,
      the rest scored exactly 0), the remainder is spread the same way with the free room
      n_l - keep_l as the score. The official code loops forever there.
    - Overshoot (the ceilings can add up to one extra weight per layer per pass): removed from
      the layers with the largest keep_l first (ties: earlier key first), each down to no less
      than its floor. The official code adds it instead (a sign bug) and works in float32.
    Scores are clamped at 0 (3 - m_vv - m_ll - m_vl >= 0 exactly; rounding can dip below).
    Raises ``AtvSparseError`` when the floors alone exceed keep_tot (tiny layers: the s_max
    guarantee and the global sparsity cannot both hold) or on bad input.
    """
    if set(scores) != set(numels):
        raise AtvSparseError(f"DAS: scores and weight counts name different layers: "
                             f"{sorted(set(scores) ^ set(numels))}")
    if not numels:
        raise AtvSparseError("DAS: no layers to allocate")
    if not 0.0 <= sparsity < 1.0:
        raise AtvSparseError(f"DAS: sparsity must be in [0, 1), got {sparsity}")
    names = list(numels)
    n = [int(numels[k]) for k in names]
    if any(v <= 0 for v in n):
        raise AtvSparseError("DAS: every layer needs a positive weight count")
    score = []
    for k in names:
        value = float(scores[k])
        if not math.isfinite(value):
            raise AtvSparseError(f"DAS: layer {k} has a non-finite score {value}")
        score.append(max(value, 0.0))

    total = sum(n)
    keep_tot = int((1 - sparsity) * total)
    s_max = sparsity + DAS_MAX_EXTRA
    floor = [min(max(math.ceil(v * (1 - s_max)), 0), v) for v in n]
    keep = list(floor)
    if sum(keep) > keep_tot:
        raise AtvSparseError(f"DAS: the per-layer floors (max sparsity {s_max:.3g}) already keep "
                             f"{sum(keep)} > {keep_tot} weights; the layers are too small for DAS, "
                             "use uniform sparsity")
    for i, v in enumerate(n):
        if keep[i] >= v:
            score[i] = 0.0

    while sum(keep) < keep_tot:
        remaining = keep_tot - sum(keep)
        weights = score
        if sum(weights) <= 0.0:  # guard: spread the rest by free room
            weights = [float(v - kv) for v, kv in zip(n, keep, strict=True)]
        ratio_total = sum(weights)
        for i in range(len(n)):
            if weights[i] > 0.0:
                keep[i] += math.ceil(weights[i] / ratio_total * remaining)
            if keep[i] >= n[i]:
                score[i] = 0.0
                keep[i] = n[i]

    excess = sum(keep) - keep_tot
    for i in sorted(range(len(n)), key=lambda j: -keep[j]):  # stable: ties keep key order
        if excess == 0:
            break
        take = min(excess, keep[i] - floor[i])
        keep[i] -= take
        excess -= take
    # floors <= keep_tot (checked above) and every keep_l >= floor_l, so the excess always fits.
    return dict(zip(names, keep, strict=True))


def das_allocation(scores: dict[str, float], numels: dict[str, int], sparsity: float) -> dict[str, float]:
    """DAS layer-wise sparsity: layer -> ``s_l = 1 - keep_l / n_l`` (``das_keep_counts``).

    Unstructured pruning only (docs/design.md 4.6); each layer is then pruned per row with its s_l
    (docs/design.md 4.1), so the weights actually kept are per-row truncations of keep_l.
    """
    keep = das_keep_counts(scores, numels, sparsity)
    return {k: 1 - keep[k] / int(numels[k]) for k in keep}
