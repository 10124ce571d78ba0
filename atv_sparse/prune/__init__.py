"""Pruning: pure score -> mask functions per method, the pruning rules, and the block-by-block driver.

A run is a ``recipe.PruneRecipe`` (the method, from ``recipe.METHODS``: its ``rule.PruningRule``
with the rule's settings and its token selector; the pattern) given to ``pipeline.prune_model``
with the calibration samples. Every pass walks the blocks through ``walk.walk_blocks``.

Public surface:
- masks: ``nm_mask``, ``unstructured_mask``, ``keep_mask`` (either, by a ``Pattern``)
- magnitude: ``magnitude_mask``
- Wanda: ``WandaStats``, ``wanda_score``
- SparseGPT: ``HessianStats``, ``sparsegpt_prune``
"""

from .magnitude import magnitude_mask
from .masks import keep_mask, nm_mask, unstructured_mask
from .sparsegpt import HessianStats, sparsegpt_prune
from .wanda import WandaStats, wanda_score

__all__ = [
    "HessianStats",
    "WandaStats",
    "keep_mask",
    "magnitude_mask",
    "nm_mask",
    "sparsegpt_prune",
    "unstructured_mask",
    "wanda_score",
]
