"""The paper's selector ablations (docs/design.md 4.5, supplementary A5): ABS, DBS and drift-fixed.

Their saliencies live on other scales than drift (attention weights are about 1/L), so Eq. 6 with
alpha would give K near 0. Each instead gets one block-independent scale c, chosen so that its
total K over blocks and samples equals the drift run's total on the same data (equal budgets):

    ABS, DBS:     K_bj = min(n_img_j, round(min(1, c * s_bar_b) * n_text_j))
    drift-fixed:  K_bj = min(n_img_j, round(min(1, c) * n_text_j))        (the same K every block)

``dense_saliencies`` measures every block's s_bar (and the drift rule's total K) on a dense pass;
``calibrate_scale`` then picks c. The pruned run's s_bar differ a little from the dense pass's, so
the report records the target and the total actually selected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import AtvSparseError
from .attention import roped_qk
from .selectors import AtvTokens, atv_budget
from .walk import RESIDENT, Residency, walk_blocks


class _ScaledTokens(AtvTokens):
    def __init__(self, tokens):
        super().__init__(tokens, alpha=1.0, budget_rule="code")
        self.scale: float | None = None

    def saliency_for_budget(self, s_bar: float) -> float:
        return s_bar

    def _budget(self, s_bar, n_img, n_text):
        if self.scale is None:
            raise AtvSparseError(f"{self.name} selector: its `scale` is not set; set it from calibrate_scale "
                                 "before pruning (pipeline.prune_model does)")
        return atv_budget(self.saliency_for_budget(s_bar), n_img, n_text, self.scale, "code")


class DriftFixedTokens(_ScaledTokens):
    """Positions by drift, one K per sample for every block (not block-adaptive)."""

    name = "drift-fixed"

    def saliency_for_budget(self, s_bar):
        return 1.0


def visual_attention(q: torch.Tensor, k: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """ABS saliency: ``s_v = mean over text positions t after the last visual position of A(t -> v)``.

    q: (heads_q, L, d), k: (heads_kv, L, d) with RoPE applied; visual, text: (L,) bool.
    A is the block's causal softmax attention in fp32, averaged over heads (GQA heads repeated).
    Returns (n_visual,) fp32; zeros when no text follows the last visual position.
    """
    vis = visual.nonzero().flatten()
    queries = (text & (torch.arange(len(text)) > vis.max())).nonzero().flatten()
    if len(queries) == 0:
        return torch.zeros(len(vis))
    q, k = q.float(), k.float().repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = q[:, queries.to(q.device)] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.arange(k.shape[1], device=q.device)[None, :] > queries.to(q.device)[:, None]
    attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).mean(0)  # (n_queries, L)
    return attn[:, vis.to(q.device)].mean(0).cpu()


class AbsTokens(_ScaledTokens):
    """Attention-based signal: visual tokens the trailing text attends to most."""

    name = "abs"

    def block_signals(self, runner, num_samples):
        with_image = [j for j in range(num_samples) if self.tokens[j].visual.any()]
        signals = [torch.zeros(0) for _ in range(num_samples)]
        for j, q, k in roped_qk(runner, with_image):
            signals[j] = visual_attention(q, k, self.tokens[j].visual, self.tokens[j].text)
        return signals


def max_min_diversity(dist: torch.Tensor, k: int) -> torch.Tensor:
    """DBS selection over a (n, n) distance matrix: first the point whose nearest other point is
    farthest, then repeatedly the point maximising its minimum distance to those chosen; ties to
    the lower index. Returns the first k indices in selection order."""
    n = dist.shape[0]
    if k <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.long)
    off = dist.masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
    first = int(torch.argmax(off.min(dim=1).values)) if n > 1 else 0
    chosen = [first]
    nearest = dist[first].clone()
    nearest[first] = float("-inf")
    while len(chosen) < min(k, n):
        nxt = int(torch.argmax(nearest))  # first maximum: the lower index on ties
        chosen.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
        nearest[chosen] = float("-inf")
    return torch.tensor(chosen, dtype=torch.long)


class DbsTokens(_ScaledTokens):
    """Diversity-based signal: ``s_v = mean_u (1 - cos(x_in_v, x_in_u))``; selection by max-min diversity."""

    name = "dbs"

    def block_signals(self, runner, num_samples):
        signals, self._dist = [], []
        for j in range(num_samples):
            t = self.tokens[j]
            x = runner.hidden[j][0, t.visual.to(runner.hidden[j].device)].float().cpu()
            unit = F.normalize(x, dim=-1)
            dist = (1 - unit @ unit.T).fill_diagonal_(0)
            n = len(x)
            signals.append(dist.sum(1) / (n - 1) if n > 1 else torch.zeros(n))
            self._dist.append(dist)
        return signals

    def _choose(self, j, signal, k):
        return max_min_diversity(self._dist[j], k)


ABLATION_SELECTORS = {"abs": AbsTokens, "dbs": DbsTokens, "drift-fixed": DriftFixedTokens}


def total_budget(selector: _ScaledTokens, s_bars: list[float], scale: float) -> int:
    """Sum over blocks and samples of K_bj for a given scale."""
    counts = [(int(t.visual.sum()), int(t.text.sum())) for t in selector.tokens]
    return sum(atv_budget(selector.saliency_for_budget(s), n_img, n_text, scale, "code")
               for s in s_bars for n_img, n_text in counts)


def calibrate_scale(selector: _ScaledTokens, s_bars: list[float], target: int) -> float:
    """The scale c whose total K (``total_budget``) is closest to ``target`` (the smaller c on ties)."""
    lo, hi = 0.0, 1.0
    while total_budget(selector, s_bars, hi) < target and hi < 1e12:
        lo, hi = hi, hi * 2
    for _ in range(80):  # smallest c reaching the target, to float precision
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total_budget(selector, s_bars, mid) >= target else (mid, hi)
    below, above = total_budget(selector, s_bars, lo), total_budget(selector, s_bars, hi)
    return lo if target - below <= above - target else hi


@torch.no_grad()
def dense_saliencies(model, layers, samples, selector: _ScaledTokens, device, alpha: float, budget_rule: str,
                     progress: bool = True, residency: Residency = RESIDENT) -> tuple[list[float], int]:
    """A dense pass over every block: (s_bar of the selector's signal per block, the drift rule's total K)."""
    drift = AtvTokens(selector.tokens, alpha, budget_rule)
    s_bars, drift_total = [], 0
    for step in walk_blocks(model, layers, samples, device, residency=residency, progress=progress):
        pooled = torch.cat(selector.block_signals(step.run, len(samples)))
        s_bars.append(pooled.mean().item() if pooled.numel() else 0.0)
        drift_total += drift.begin_block(step.index, step.run, len(samples))["visual_tokens"]
        step.propagate("Budget dense pass")
    return s_bars, drift_total


__all__ = ["ABLATION_SELECTORS", "AbsTokens", "DbsTokens", "DriftFixedTokens", "calibrate_scale",
           "dense_saliencies", "max_min_diversity", "total_budget", "visual_attention"]
