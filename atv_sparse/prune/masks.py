"""Score -> keep-mask rules shared by every pruner (docs/design.md 4.1).

A mask is a bool tensor shaped like the weight, ``True`` = kept. Ties are broken exactly as the
reference implementations (wanda @8e8fc87, sparsegpt @147d215) break them, so masks match theirs
bit for bit.
"""

from __future__ import annotations

import torch

from ..errors import AtvSparseError
from ..patterns import Pattern


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive input columns in each row.

    score: (out, in) any float dtype; in % m == 0.
    Returns keep: (out, in) bool with exactly ``n`` True per group.

    The ``m - n`` lowest of each group are pruned with ``torch.topk(..., largest=False)`` on the
    fp32 group scores, the reference's rule; one batched topk over (out, in/m, m) picks the same
    elements as the reference's per-group loop (checked on exact ties in the tests).
    """
    out_features, in_features = score.shape
    if not 0 < n < m:
        raise AtvSparseError(f"N:M needs 0 < N < M, got {n}:{m}")
    if in_features % m != 0:
        raise AtvSparseError(f"in_features={in_features} is not a multiple of M={m} for pattern {n}:{m}")
    groups = score.float().reshape(out_features, in_features // m, m)
    pruned = torch.topk(groups, m - n, dim=-1, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, pruned, False)
    return keep.reshape(out_features, in_features)


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row, prune the ``int(in * sparsity)`` lowest scores (stable ascending sort).

    score: (out, in) any float dtype. Returns keep: (out, in) bool; every row has exactly
    ``int(in * sparsity)`` False.
    """
    in_features = score.shape[1]
    num_pruned = int(in_features * sparsity)
    order = torch.sort(score, dim=-1, stable=True).indices[:, :num_pruned]
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, order, False)
    return keep


def keep_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """score: (out, in) any float dtype -> keep: (out, in) bool, ``nm_mask`` for an N:M ``pattern``,
    else ``unstructured_mask`` with its sparsity."""
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    return unstructured_mask(score, pattern.sparsity)
