"""What a pruning rule is to the rest of the package: one object the driver, the estimate and the
report ask (docs/design.md 10).

A rule is a frozen dataclass whose fields are its own settings (SparseGPT's ``blocksize`` and
``percdamp``, TAMP's ``das``), validated in ``__post_init__``. It says

- ``calibrated``: whether it needs calibration statistics (magnitude does not);
- ``new_stats(in_features, device)``: an empty statistics object for one linear (``update(x)``
  with the linear's input rows, ``nsamples``), and ``statistic(stats)``: its accumulated tensor,
  which the driver checks is finite;
- ``prune(weight, stats, pattern)``: prune ``weight`` (out, in) in place, return its keep-mask;
- ``stats_bytes(linears)``: the peak memory of one block's statistics and working copies for
  the block's target linears, for ``convert/estimate.py`` (no default: a rule that forgets it fails);
- ``settings()``: the settings it records in quantization_config and prune_report.json;
- ``layer_sparsities(...)``: optional per-layer sparsities from a pre-pass (TAMP's DAS).

The rules: ``magnitude.Magnitude``, ``wanda.Wanda``, ``sparsegpt.SparseGpt``,
``tamp_tokens.Tamp``; ``recipe.METHODS`` names them. This module imports nothing else from prune/
but the walk, so every rule module can import it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..patterns import Pattern
from .walk import RESIDENT, Residency


@dataclasses.dataclass(frozen=True)
class PruningRule:
    """Base of every rule; subclasses set ``name`` and override what differs."""

    name: ClassVar[str]
    calibrated: ClassVar[bool] = True
    # The timing label of ``layer_sparsities`` in prune_report.json, when it runs a pass.
    pre_pass_name: ClassVar[str] = "layer-sparsity pre-pass"

    def new_stats(self, in_features: int, device: torch.device):
        """Empty statistics of one linear with ``in_features`` inputs, on ``device``."""
        raise NotImplementedError(f"{type(self).__name__} uses no calibration statistics")

    def statistic(self, stats) -> torch.Tensor:
        """The tensor ``stats`` accumulated (checked to be finite before pruning)."""
        return stats.scaler_row

    def prune(self, weight: torch.Tensor, stats, pattern: Pattern) -> torch.Tensor:
        """Prune ``weight`` (out, in) in place by ``pattern`` from ``stats`` (None when not
        calibrated); return its keep-mask (out, in) bool."""
        raise NotImplementedError

    def stats_bytes(self, linears: list[nn.Linear]) -> int:
        """Peak bytes of one block's statistics and this rule's working memory, for its target
        ``linears`` (shapes only: they may live on the meta device)."""
        raise NotImplementedError(f"{type(self).__name__} has no memory estimate (PruningRule.stats_bytes)")

    def settings(self) -> dict:
        """The settings that change this rule's result, as recorded beside the weights."""
        return {}

    def layer_sparsities(self, model: nn.Module, layers: nn.ModuleList, layers_prefix: str,
                         targets: dict[str, nn.Linear], samples: list[dict] | None, tokens: list | None,
                         device: torch.device, pattern: Pattern, *, progress: bool = True,
                         residency: Residency = RESIDENT) -> dict[str, float] | None:
        """Per-module unstructured sparsities replacing ``pattern``'s, or None (the pattern everywhere)."""
        return None

    def check(self, pattern: Pattern) -> None:
        """Refuse a pattern this rule's settings cannot serve (an ``AtvSparseError`` naming them)."""


def prune_by_score(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero ``weight`` where ``keep`` is False, in place; return ``keep``."""
    weight.masked_fill_(~keep, 0)
    return keep


__all__ = ["PruningRule", "prune_by_score"]
