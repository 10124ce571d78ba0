"""Analysis tools built on the pruning core.

- outliers: ``add_outlier_channels`` gives a model the outlier input channels real LLMs have, without
  changing its outputs (``python -m atv_sparse.analysis.outliers MODEL_DIR --out OUT``).
- mot: the Mixture-of-Transformers probe (docs/design.md 4.7): ``attach_mot`` duplicates each block's
  linears into a textual and a visual pathway routed by the image-token mask; ``mot_prune`` prunes
  one pathway with Wanda.
"""
