"""Magnitude pruning (docs/design.md 4.2): score |W|, no calibration data."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..patterns import Pattern
from .masks import nm_mask
from .rule import PruningRule, prune_by_score


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask (out, in) bool of ``weight`` (out, in) by |W| in the weight's dtype.

    Unstructured uses one threshold per matrix like the reference: ``t = sort(|W|.flatten())[int(numel * s)]``
    and prunes every ``|W| <= t``, i.e. ``int(numel * s) + 1`` weights plus ties (kept for
    comparability with published magnitude baselines). N:M as ``nm_mask``.
    """
    score = weight.abs()
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    thresh = torch.sort(score.flatten())[0][int(weight.numel() * pattern.sparsity)]
    return score > thresh


@dataclasses.dataclass(frozen=True)
class Magnitude(PruningRule):
    """``magnitude_mask`` per linear; no calibration data, no settings."""

    name = "magnitude"
    calibrated = False

    def prune(self, weight, stats, pattern):
        return prune_by_score(weight, magnitude_mask(weight, pattern))

    def stats_bytes(self, linears: list[nn.Linear]) -> int:
        return max(lin.weight.numel() * 4 for lin in linears)  # one linear's |W| and its sort
