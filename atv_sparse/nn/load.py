"""``atv_sparse.load``: a compressed (or dense-with-zeros) checkpoint as a ``transformers`` model."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from ..errors import AtvSparseError
from ..formats.validate import validate_checkpoint
from ..ops.dispatch import BACKENDS
from .prepare import prepare_model
from .fused import fuse_decoder_blocks
from .hf_quantizer import register
from .load_ct import is_compressed_tensors_dir, load_compressed_tensors


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         backend: str = "auto", fuse: bool | None = None, autotune: bool = True, dense_fallback: bool = True,
         progress: bool = True, verify: bool = False):
    """Load ``path`` with every pruned linear as a ``SparseLinear`` running on ``backend``.

    The class comes from config.json's ``architectures`` (null or absent: from its ``model_type``,
    as ``convert`` infers it, ``atv_sparse.models.adapter.MODEL_TYPES``); tensors are validated (popcounts, N:M
    groups, shapes) and a corrupt or truncated file is refused with a message naming it.
    dtype: None keeps the checkpoint's dtype. backend: ``auto`` (per token count: the ``cpu``
    kernels on a CPU, the reference backend where they did not build; on a GPU a plan measured once per layer shape and cached, see
    ``atv_sparse.ops.autotune``; ``autotune=False`` uses the heuristic plan), or one of ``cuda``,
    ``triton``, ``cusparselt``, ``cpu``, ``reference`` for every layer (an error names a layer it cannot run).
    fuse: stack q/k/v and gate/up of LLaMA / Qwen2 blocks into one kernel each (default: on a GPU).
    dense_fallback: keep a dense copy of a layer where dense cuBLAS measured faster than every
    sparse kernel for some token count (never slower than dense; costs that copy's memory).
    verify: hash every shard and compare with the digests the writer recorded
    (``python -m atv_sparse.verify``). Off by default: SHA-256 runs at about 1 GB/s per core, and
    reading every byte once more took 10-18% of this function's own time on a 2.1 GB packed
    checkpoint (2-core CPU, page cache warm): some 20 s more for 16 GB, and relatively more
    where loading is faster than here. Check once after a download or copy instead.

    Before any tensor is read, config.json, its ``quantization_config``, the index and every
    shard header are validated (``atv_sparse.formats.validate``); after loading, a tensor the
    model expects but the checkpoint lacks, or one the model has no place for, is refused
    (transformers would leave the first as random values and only warn).

    A compressed-tensors checkpoint (llm-compressor's sparse-24-bitmask, sparse-bitmask, or dense
    weights declared 2:4) loads as published: translated and checked while loading, as
    ``python -m atv_sparse.import_ct`` would write it (docs/design.md 6.1).
    """
    register()
    path = Path(path)
    if is_compressed_tensors_dir(path):  # llm-compressor's sparse formats, translated while loading
        model = load_compressed_tensors(path, dtype)
    else:
        model = _load_checkpoint(path, dtype, verify)
    if backend not in BACKENDS:
        raise AtvSparseError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    model = model.to(device).eval()
    if fuse if fuse is not None else torch.device(device).type == "cuda":
        fuse_decoder_blocks(model)
    prepare_model(model, backend, autotune=autotune, dense_fallback=dense_fallback, progress=progress)
    return model


def _load_checkpoint(path: Path, dtype, verify: bool):
    """An atv_sparse (or dense) checkpoint through ``from_pretrained``, validated before and after."""
    checked = validate_checkpoint(path)
    if verify:
        from ..formats.verify import verify_checkpoint

        verify_checkpoint(path)
    architectures = checked.config.get("architectures") or []
    if not architectures:  # null or absent (transformers' GGUF reader): the class from model_type, as convert does
        from ..models.adapter import adapter_for

        architectures = [adapter_for(checked.config, path).architecture]
    model_class = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if model_class is None:
        raise AtvSparseError(f"{path / 'config.json'}: no transformers class for architectures {architectures}")
    model, info = model_class.from_pretrained(path, dtype="auto" if dtype is None else dtype,
                                              output_loading_info=True)
    for kind, what in (("missing_keys", "the model needs it but no shard holds it"),
                       ("unexpected_keys", "the model has no parameter of that name")):
        names = sorted(info.get(kind) or [])
        if names:
            raise AtvSparseError(f"{path}: tensor {names[0]}: {what} ({len(names)} such tensor(s)); the "
                                 "checkpoint does not match its config.json; convert it again")
    return model
