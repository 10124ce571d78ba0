"""Wanda (docs/design.md 4.3): score ``|W| * sqrt(r)``, r the running mean of squared input norms."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .masks import keep_mask
from .rule import PruningRule, prune_by_score


class WandaStats:
    """Per-input-column activation statistics of one linear layer, accumulated like the reference.

    ``scaler_row``: (in,) fp32, the running mean over *sequences* of ``sum_t x_t^2``;
    ``nsamples``: the number of sequences seen.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.scaler_row = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def update(self, x: torch.Tensor) -> None:
        """x: (B, T, in) or (T, in) (counts as B = 1), any float dtype."""
        batch = 1 if x.dim() == 2 else x.shape[0]
        rows = x.reshape(-1, x.shape[-1]).t().to(self.scaler_row.device)
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += torch.norm(rows.float(), p=2, dim=1) ** 2 / self.nsamples


def wanda_score(weight: torch.Tensor, stats: WandaStats | torch.Tensor) -> torch.Tensor:
    """weight: (out, in); stats: ``WandaStats`` or its (in,) fp32 ``scaler_row``. Returns (out, in) fp32."""
    scaler_row = stats.scaler_row if isinstance(stats, WandaStats) else stats
    return torch.abs(weight) * torch.sqrt(scaler_row.to(weight.device).reshape((1, -1)))


@dataclasses.dataclass(frozen=True)
class Wanda(PruningRule):
    """``wanda_score`` from ``WandaStats`` (sequences counted), masks as docs/design.md 4.1; no settings."""

    name = "wanda"

    def new_stats(self, in_features, device):
        return WandaStats(in_features, device=device)

    def prune(self, weight, stats, pattern):
        return prune_by_score(weight, keep_mask(wanda_score(weight, stats), pattern))

    def stats_bytes(self, linears: list[nn.Linear]) -> int:
        # fp32 vectors for every linear, then one linear's fp32 scores
        return sum(lin.in_features * 4 for lin in linears) + max(lin.weight.numel() * 4 for lin in linears)
