"""``atv_sparse.load``: a compressed (or dense-with-zeros) checkpoint as a ``transformers`` model."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from ..errors import AtvSparseError
from ..formats.safetensors_io import checkpoint_files, checkpoint_tensors
from ..formats.spec import check_quantization_config
from ..models.adapter import read_config
from ..ops.dispatch import BACKENDS
from .autotune import prepare_model
from .fused import fuse_decoder_blocks
from .hf_quantizer import register


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         backend: str = "auto", fuse: bool | None = None, autotune: bool = True, dense_fallback: bool = True,
         progress: bool = True):
    """Load ``path`` with every pruned linear as a ``SparseLinear`` running on ``backend``.

    The class comes from config.json's ``architectures``; tensors are validated (popcounts, N:M
    groups, shapes) and a corrupt or truncated file is refused with a message naming it.
    dtype: None keeps the checkpoint's dtype. backend: ``auto`` (per token count: the reference
    backend on a CPU; on a GPU a plan measured once per layer shape and cached, see
    ``atv_sparse.nn.autotune``; ``autotune=False`` uses the heuristic plan), or one of ``cuda``,
    ``triton``, ``cusparselt``, ``reference`` for every layer (an error names a layer it cannot run).
    fuse: stack q/k/v and gate/up of LLaMA / Qwen2 blocks into one kernel each (default: on a GPU).
    dense_fallback: keep a dense copy of a layer where dense cuBLAS measured faster than every
    sparse kernel for some token count (never slower than dense; costs that copy's memory).
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
    if backend not in BACKENDS:
        raise AtvSparseError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    model = model.to(device).eval()
    if fuse if fuse is not None else torch.device(device).type == "cuda":
        fuse_decoder_blocks(model)
    prepare_model(model, backend, autotune=autotune, dense_fallback=dense_fallback, progress=progress)
    return model
