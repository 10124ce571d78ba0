"""Token selectors: which positions of each calibration sample feed a block's statistics.

The block driver calls ``begin_block(b, runner, num_samples)`` once per block before its
statistics pass and ``positions(j)`` for each sample during it (docs/design.md 4.5):

- ``mixed``: every position (Wanda's default); ``text``: the text positions; ``visual``: the
  image-token positions.
- ``atv``: all text positions plus, per sample, the K_j visual positions that drift most through
  the still-dense block, K_j from the block saliency s_bar (Eq. 4-7).
- ``random``: the same K_j as ``atv``, positions drawn with a seeded generator.
- ``abs``, ``dbs``, ``drift-fixed``: the paper's ablations (ablation_tokens.py).

The interface (``walk.TokenSelector``) and ``recipe.SELECTORS``, the table that builds one by
name, live below and above this module, so that selectors never import the modules that use them.

Positions are returned sorted ascending, so a selection of every position reads exactly the rows
``mixed`` reads, in the same order.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn.functional as F

from ..calib.calibration_set import SampleTokens
from ..errors import AtvSparseError
from .walk import TokenSelector

BUDGET_RULES = ("code", "paper")


class MixedTokens(TokenSelector):
    """Every position."""

    name = "mixed"

    def __init__(self, tokens: list[SampleTokens] | None = None):
        self.tokens = tokens


class _MaskTokens(MixedTokens):
    def positions(self, j):
        return self._mask(self.tokens[j]).nonzero().flatten()


class TextTokens(_MaskTokens):
    """Text positions only (alpha = 0 of ATV)."""

    name = "text"

    @staticmethod
    def _mask(t: SampleTokens):
        return t.text


class VisualTokens(_MaskTokens):
    """Image-token positions only."""

    name = "visual"

    @staticmethod
    def _mask(t: SampleTokens):
        return t.visual


def visual_drift(x_in: torch.Tensor, x_out: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``s_v = 1 - cos(x_in_v, x_out_v)`` in fp32 at each visual position.

    x_in, x_out: (1, T, H) the hidden state entering block b and the block's output; visual: (T,)
    bool. Returns (n_visual,) fp32, in position order.
    """
    v = visual.to(x_in.device)
    a, b = x_in[0, v].float(), x_out[0, v].to(x_in.device).float()
    return 1 - F.cosine_similarity(a, b, dim=-1)


def atv_budget(s_bar: float, n_img: int, n_text: int, alpha: float, rule: str = "code") -> int:
    """Eq. 6. ``code`` (the official code's): ``min(n_img, round(min(1, alpha * s_bar) * n_text))``
    with Python's round (half to even); ``paper``: ``min(n_img, floor(alpha * s_bar * n_text))``."""
    if n_img == 0:
        return 0
    if rule == "code":
        return min(n_img, round(min(1.0, alpha * s_bar) * n_text))
    if rule == "paper":
        return min(n_img, math.floor(alpha * s_bar * n_text))
    raise AtvSparseError(f"`rule` {rule!r}: choose one of {', '.join(BUDGET_RULES)}")


def top_drift(drift: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 7: indices (into ``drift``) of the k largest drifts, ties to the lower index."""
    order = torch.sort(-drift, stable=True).indices
    return order[:k]


class AtvTokens(TokenSelector):
    """ATV-Pruning's asymmetric pool: all text tokens + the K_j most drifting visual tokens."""

    name = "atv"

    def __init__(self, tokens: list[SampleTokens], alpha: float = 1.0, budget_rule: str = "code"):
        if alpha < 0:
            raise AtvSparseError(f"`alpha` must be >= 0, got {alpha}")
        if budget_rule not in BUDGET_RULES:
            raise AtvSparseError(f"`budget_rule` {budget_rule!r}: choose one of {', '.join(BUDGET_RULES)}")
        self.tokens, self.alpha, self.rule = tokens, alpha, budget_rule
        self._positions: list[torch.Tensor] = []

    def begin_block(self, block_index, runner, num_samples) -> dict:
        t0 = time.perf_counter()
        signals = self.block_signals(runner, num_samples)
        pooled = torch.cat(signals)
        if pooled.numel() == 0:
            if block_index == 0:
                warnings.warn("no calibration sample has an image: ATV selects no visual token (K = 0)",
                              stacklevel=2)
            s_bar = 0.0
        else:
            s_bar = pooled.mean().item()
        ks = [self._budget(s_bar, int(t.visual.sum()), int(t.text.sum())) for t in self.tokens]
        self._positions = [self._select(j, signals[j], k) for j, k in enumerate(ks)]
        return {"s_bar": s_bar, "k_mean": sum(ks) / len(ks), "k_min": min(ks), "k_max": max(ks),
                "text_tokens": sum(int(t.text.sum()) for t in self.tokens), "visual_tokens": sum(ks),
                "samples_without_image": sum(1 for t in self.tokens if not t.visual.any()),
                "time_drift_s": time.perf_counter() - t0, "k": ks}

    def block_signals(self, runner, num_samples) -> list[torch.Tensor]:
        """Per sample, the saliency s_v of each visual position (n_visual,) fp32 on the CPU: the drift."""
        signals = []
        for j in range(num_samples):
            t = self.tokens[j]
            if t.visual.any():
                x_in, x_out = runner.pair(j)
                signals.append(visual_drift(x_in, x_out, t.visual).cpu())
            else:
                signals.append(torch.zeros(0))
        return signals

    def _budget(self, s_bar: float, n_img: int, n_text: int) -> int:
        return atv_budget(s_bar, n_img, n_text, self.alpha, self.rule)

    def _select(self, j: int, drift: torch.Tensor, k: int) -> torch.Tensor:
        t = self.tokens[j]
        visual_positions = t.visual.nonzero().flatten()
        chosen = visual_positions[self._choose(j, drift, k)]
        return torch.sort(torch.cat([t.text.nonzero().flatten(), chosen])).values

    def _choose(self, j: int, drift: torch.Tensor, k: int) -> torch.Tensor:
        return top_drift(drift, k)

    def positions(self, j):
        return self._positions[j]


class RandomTokens(AtvTokens):
    """ATV's K_j per block, visual positions drawn at random (seeded per block and sample)."""

    name = "random"

    def __init__(self, tokens, alpha=1.0, budget_rule="code", seed: int = 0):
        super().__init__(tokens, alpha, budget_rule)
        self.seed = seed
        self._block = 0

    def begin_block(self, block_index, runner, num_samples) -> dict:
        self._block = block_index
        return super().begin_block(block_index, runner, num_samples)

    def _choose(self, j, drift, k):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._block * 10_007 + j)
        return torch.randperm(drift.numel(), generator=gen)[:k]
