"""``atv_sparse.load``: a compressed (or dense-with-zeros) checkpoint as a ``transformers`` model."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from ..errors import AtvSparseError
from ..formats.safetensors_io import checkpoint_files, checkpoint_tensors
from ..formats.spec import check_quantization_config
from ..models.adapter import read_config
from .hf_quantizer import register
from .sparse_linear import SparseLinear


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         backend: str = "auto"):
    """Load ``path`` with every pruned linear as a ``SparseLinear`` running on ``backend``.

    The class comes from config.json's ``architectures``; tensors are validated (popcounts, N:M
    groups, shapes) and a corrupt or truncated file is refused with a message naming it.
    dtype: None keeps the checkpoint's dtype. backend: see ``atv_sparse.ops`` (``auto`` is the
    reference backend on a CPU).
    """
    register()
    path = Path(path)
    config = read_config(path)
    block = config.get("quantization_config")
    if block is not None:
        check_quantization_config(block, str(path / "config.json"))
    checkpoint_tensors(checkpoint_files(path))  # headers and file sizes, before transformers reads them
    architectures = config.get("architectures") or []
    model_class = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if model_class is None:
        raise AtvSparseError(f"{path / 'config.json'}: no transformers class for architectures {architectures}")
    model = model_class.from_pretrained(path, dtype="auto" if dtype is None else dtype)
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.backend = backend
    return model.to(device).eval()
