"""TAMP's token selection in the block driver (docs/design.md 4.6): AMIA per linear, DAS sparsities.

``TampTokens`` is a per-linear selector: before a block's statistics pass it computes each
sample's attention contribution ``a_j`` from the block's own queries and keys (``roped_qk``); during the pass, each linear's hook asks ``linear_positions(j, name, output)`` for AMIA's
positions chosen from that linear's output rows. ``das_sparsities`` is DAS's dense pre-pass.
The maths lives in ``tamp.py``; this module only wires it to the running model.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from ..calib.calibration_set import SampleTokens
from ..errors import AtvSparseError
from .attention import roped_qk
from .walk import RESIDENT, Residency, TokenSelector, walk_blocks
from .tamp import TampStats, amia_select, attention_contribution, das_allocation, das_score, modality_similarity
from .wanda import Wanda


class TampTokens(TokenSelector):
    """AMIA's selection for every linear of a block, from that linear's own output rows."""

    name = "tamp"
    per_linear = True

    def __init__(self, tokens: list[SampleTokens]):
        self.tokens = tokens
        self.scores: list[torch.Tensor] = []
        self._selected: dict[str, int] = {}

    def begin_block(self, block_index, runner, num_samples) -> dict:
        t0 = time.perf_counter()
        self.scores = []
        for j, q, k in roped_qk(runner, range(num_samples)):
            real = self.tokens[j].text | self.tokens[j].visual
            last = int(real.nonzero().max())
            self.scores.append(attention_contribution(q, k, last, key_mask=real.to(q.device)).cpu())
        self._selected = {}
        return {"time_attention_s": time.perf_counter() - t0, "tamp_selected": self._selected}

    def linear_positions(self, j: int, name: str, output: torch.Tensor) -> torch.Tensor:
        """output: (1, T, out) of linear ``name`` on sample j -> AMIA's positions (int64)."""
        t = self.tokens[j]
        chosen = amia_select(output[0].float(), self.scores[j].to(output.device), t.visual.to(output.device),
                             sample=f"calibration sample {j} at {name}")
        short = name.rsplit(".", 1)[-1]
        self._selected[short] = self._selected.get(short, 0) + len(chosen)
        return chosen


@torch.no_grad()
def das_sparsities(model, layers, layers_prefix: str, targets: dict[str, nn.Linear], samples: list[dict],
                   tokens: list[SampleTokens], device: torch.device, sparsity: float, progress: bool = True,
                   residency: Residency = RESIDENT) -> tuple[dict[str, float], dict[str, float]]:
    """DAS: a dense pass over every block; per target linear, m_vv, m_ll, m_vl of its output rows
    averaged over samples give ``score_l = 3 - m_vv - m_ll - m_vl``, then ``das_allocation``.

    Returns (sparsity per module name, score per module name).
    """
    sums: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in targets}
    current = [0]

    def hook_for(name):
        def hook(module, args, output):
            sims = modality_similarity(output[0].float(), tokens[current[0]].visual.to(output.device),
                                       sample=f"calibration sample {current[0]} at {name}")
            acc = sums[name]
            acc[0], acc[1], acc[2] = acc[0] + sims.m_vv, acc[1] + sims.m_ll, acc[2] + sims.m_vl
        return hook

    for step in walk_blocks(model, layers, samples, device, residency=residency, progress=progress):
        prefix = f"{layers_prefix}.{step.index}."
        handles = [mod.register_forward_hook(hook_for(name)) for name, mod in targets.items()
                   if name.startswith(prefix)]
        try:
            step.propagate("DAS dense pass", before_sample=lambda j: current.__setitem__(0, j))
        finally:
            for h in handles:
                h.remove()
    n = len(samples)
    scores = {name: das_score(*(v / n for v in acc)) for name, acc in sums.items()}
    numels = {name: mod.weight.numel() for name, mod in targets.items()}
    return das_allocation(scores, numels, sparsity), scores


@dataclasses.dataclass(frozen=True)
class Tamp(Wanda):
    """TAMP's statistics (``TampStats``: tokens counted) with Wanda's score. das: layer-wise
    sparsities from DAS (``das_sparsities``), unstructured patterns only."""

    name = "tamp"
    pre_pass_name = "DAS pre-pass"
    das: bool = dataclasses.field(default=False, metadata={"only": "`method` tamp with `pattern` unstructured"})

    def check(self, pattern):
        if self.das and pattern.is_nm:
            raise AtvSparseError("`das` applies to `method` tamp with `pattern` unstructured only")

    def new_stats(self, in_features, device):
        return TampStats(in_features, device=device)

    def settings(self) -> dict:
        return {"das": True} if self.das else {}

    def layer_sparsities(self, model, layers, layers_prefix, targets, samples, tokens, device, pattern, *,
                         progress=True, residency=RESIDENT):
        if not self.das:
            return None
        return das_sparsities(model, layers, layers_prefix, targets, samples, tokens, device, pattern.sparsity,
                              progress=progress, residency=residency)[0]
