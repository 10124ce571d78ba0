"""Independent, deliberately literal reference implementations of the pruning core.

These are an oracle for ``atv_sparse.prune``. They are written from the design
document's semantics and follow the operation order of the public reference code
(locuslab/wanda @8e8fc87: lib/prune.py, lib/layerwrapper.py, lib/sparsegpt.py, which
vendors IST-DASLab/sparsegpt @f5c2500). They use plain Python loops (per row, per
group, per column) on purpose: do not "optimise" them, their value is that they are
simple enough to check by eye.

Conventions
-----------
* ``keep`` masks are bool, True = weight kept. The reference code builds a mask of
  PRUNED entries (``W_mask``); these helpers build that literally and return its
  complement.
* "N:M" means keep N of every M consecutive input columns in each row (the design
  document's convention). NOTE: in the wanda repository ``prune_n`` is passed to
  ``torch.topk(..., prune_n, largest=False)`` i.e. it is the number PRUNED; for 2:4 and
  4:8 both conventions coincide, for 1:4 / 3:8 they do not. We follow the design
  document: prune ``m - n``.
* Sparsity counts use Python float arithmetic with truncation: ``int(cols * s)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ref_nm_pruned",
    "ref_nm_keep",
    "ref_unstructured_keep",
    "ref_magnitude_keep",
    "RefWandaStats",
    "ref_wanda_score",
    "RefHessianStats",
    "ref_sparsegpt_prune",
    "py_nm_keep_tiefree",
    "py_unstructured_keep",
]


# ---------------------------------------------------------------------------
# 4.1 Masks
# ---------------------------------------------------------------------------


def ref_nm_pruned(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """PRUNED mask for N:M, literally the wanda loop.

    ``for ii in range(cols): if ii % m == 0: tmp = W_metric[:, ii:ii+m].float();
    W_mask.scatter_(1, ii + topk(tmp, m - n, dim=1, largest=False)[1], True)``
    """
    assert score.dim() == 2
    cols = score.shape[1]
    if cols % m != 0:
        raise ValueError(f"in_features={cols} not a multiple of m={m}")
    W_mask = torch.zeros_like(score) == 1  # all False, pruned marks
    n_prune = m - n
    for ii in range(cols):
        if ii % m == 0:
            tmp = score[:, ii:(ii + m)].float()
            if n_prune > 0:
                W_mask.scatter_(1, ii + torch.topk(tmp, n_prune, dim=1, largest=False)[1], True)
    return W_mask


def ref_nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return ~ref_nm_pruned(score, n, m)


def ref_unstructured_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row unstructured: stable ascending sort of each row, prune the first
    int(cols * sparsity). Done one row at a time (stable sort is deterministic, so this
    equals the reference's batched ``torch.sort(W_metric, dim=-1, stable=True)``)."""
    assert score.dim() == 2
    rows, cols = score.shape
    k = int(cols * sparsity)
    W_mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        idx = torch.sort(score[r], dim=-1, stable=True)[1][:k]
        W_mask[r, idx] = True
    return ~W_mask


# ---------------------------------------------------------------------------
# 4.2 Magnitude
# ---------------------------------------------------------------------------


def ref_magnitude_keep(weight: torch.Tensor, sparsity=None, n=None, m=None) -> torch.Tensor:
    """wanda ``prune_magnitude``: score |W| in the weight's dtype.

    Unstructured: ONE threshold for the whole matrix,
    ``thresh = sort(|W|.flatten())[int(numel * s)]``, prune ``|W| <= thresh``.
    N:M: as ``ref_nm_pruned``.
    """
    W_metric = torch.abs(weight)
    if n is not None:
        assert sparsity is None and m is not None
        W_mask = ref_nm_pruned(W_metric, n, m)
    else:
        assert sparsity is not None and m is None
        thresh = torch.sort(W_metric.flatten())[0][int(weight.numel() * sparsity)]
        W_mask = W_metric <= thresh
    return ~W_mask


# ---------------------------------------------------------------------------
# 4.3 Wanda
# ---------------------------------------------------------------------------


class RefWandaStats:
    """Literal copy of the arithmetic of wanda's ``WrappedGPT.add_batch`` (nn.Linear)."""

    def __init__(self, in_features: int):
        self.columns = in_features
        self.scaler_row = torch.zeros((in_features,))  # fp32
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()

        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp

        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples

    update = add_batch


def ref_wanda_score(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """``torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))`` (fp32 by promotion)."""
    return torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))


# ---------------------------------------------------------------------------
# 4.4 SparseGPT
# ---------------------------------------------------------------------------


class RefHessianStats:
    """Literal copy of the arithmetic of ``SparseGPT.add_batch`` (nn.Linear)."""

    def __init__(self, in_features: int):
        self.columns = in_features
        self.H = torch.zeros((in_features, in_features))  # fp32
        self.nsamples = 0

    @property
    def hessian(self) -> torch.Tensor:
        return self.H

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    update = add_batch


def ref_sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity=None,
                        n=None, m=None, blocksize: int = 128, percdamp: float = 0.01):
    """``SparseGPT.fasterprune`` on a copy of ``hessian``.

    Returns ``(W_fp32, keep)``: the pruned/updated weight in fp32 (the caller casts to
    the weight dtype for comparison) and the keep mask (complement of the pruned mask).
    """
    nm = n is not None
    if nm:
        assert sparsity is None and m is not None
        prune_k = m - n  # number pruned per group (design doc convention)
    else:
        assert sparsity is not None and m is None

    W = weight.detach().clone().float()
    rows, columns = W.shape

    H = hessian.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    full_pruned = torch.zeros(rows, columns, dtype=torch.bool)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if not nm:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if nm and i % m == 0:
                tmp = W1[:, i:(i + m)] ** 2 / (torch.diag(Hinv1)[i:(i + m)].reshape((1, -1))) ** 2
                if prune_k > 0:
                    mask1.scatter_(1, i + torch.topk(tmp, prune_k, dim=1, largest=False)[1], True)

            q = w.clone()
            q[mask1[:, i]] = 0

            Q1[:, i] = q

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        full_pruned[:, i1:i2] = mask1

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return W, ~full_pruned


# ---------------------------------------------------------------------------
# Pure-Python cross-checks of the oracle itself (no torch ordering involved)
# ---------------------------------------------------------------------------


def py_nm_keep_tiefree(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep mask with plain Python sorting. Only meaningful for tie-free groups
    (torch.topk's order among exact ties is implementation-defined)."""
    rows, cols = score.shape
    vals = score.float().tolist()
    keep = [[True] * cols for _ in range(rows)]
    for r in range(rows):
        for g in range(0, cols, m):
            grp = sorted(range(g, g + m), key=lambda j: vals[r][j])
            for j in grp[: m - n]:
                keep[r][j] = False
    return torch.tensor(keep, dtype=torch.bool)


def py_unstructured_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row unstructured keep mask with Python's (stable) sort: among ties the lower
    column index is pruned first, which is what a stable ascending sort does."""
    rows, cols = score.shape
    k = int(cols * sparsity)
    vals = score.float().tolist()
    keep = [[True] * cols for _ in range(rows)]
    for r in range(rows):
        order = sorted(range(cols), key=lambda j: (vals[r][j], j))
        for j in order[:k]:
            keep[r][j] = False
    return torch.tensor(keep, dtype=torch.bool)
