"""Magnitude pruning (docs/design.md 4.2): score |W|, no calibration data."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .masks import check_mask_args, nm_mask
from .rule import PruningRule, mask_args, prune_by_score


def magnitude_mask(weight: torch.Tensor, sparsity: float | None = None, n: int | None = None,
                   m: int | None = None) -> torch.Tensor:
    """Keep-mask of ``weight`` (out, in) by |W| in the weight's dtype.

    Unstructured uses one threshold per matrix like the reference: ``t = sort(|W|.flatten())[int(numel * s)]``
    and prunes every ``|W| <= t``, i.e. ``int(numel * s) + 1`` weights plus ties (kept for
    comparability with published magnitude baselines). N:M as ``nm_mask``.
    """
    check_mask_args(sparsity, n, m)
    score = weight.abs()
    if m is not None:
        return nm_mask(score, n, m)
    thresh = torch.sort(score.flatten())[0][int(weight.numel() * sparsity)]
    return score > thresh


@dataclasses.dataclass(frozen=True)
class Magnitude(PruningRule):
    """``magnitude_mask`` per linear; no calibration data, no settings."""

    name = "magnitude"
    calibrated = False

    def prune(self, weight, stats, pattern):
        return prune_by_score(weight, magnitude_mask(weight, **mask_args(pattern)))

    def stats_bytes(self, linears: list[nn.Linear]) -> int:
        return max(lin.weight.numel() * 4 for lin in linears)  # one linear's |W| and its sort
