"""``transformers`` custom-quantizer route: ``from_pretrained`` on an atv-sparse checkpoint.

Registered under ``quant_method = "atv_sparse"`` when ``atv_sparse`` is imported. Before weights
load, every linear that has ``P.weight_bitmask`` in the checkpoint becomes a ``SparseLinear``
shaped from the safetensors headers (an unstructured ``weight_values`` has a per-layer length);
after loading every pair is validated. Before any of that, as soon as transformers knows the
model's directory, the same validation as ``atv_sparse.load`` runs (``formats.validate``: config.json schema, index,
every shard header), so both routes refuse a bad file with the same message. Without the import,
transformers only warns and loads random dense weights, which is why the README insists on
importing atv_sparse first.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import AtvSparseError
from ..formats.bitmask import BITMASK_SUFFIX, VALUES_SUFFIX, bitmask_shape, values_shape
from ..formats.spec import QUANT_METHOD, QuantizationBlock
from ..formats.validate import validate_checkpoint
from .sparse_linear import SparseLinear


class AtvSparseConfig(QuantizationConfigMixin):
    """transformers' view of the ``quantization_config`` block (docs/design.md 6): an adapter that
    holds the one validated type, ``formats.spec.QuantizationBlock`` (``self.block``).

    transformers builds it with ``cls(**block)`` before it touches any shard, so the block is
    checked here first. The message cannot name the directory (transformers does not pass it);
    the full validation (``formats.validate``), which does, follows in ``_process_model_before_weight_loading``.
    """

    def __init__(self, **block):
        self.quant_method = QUANT_METHOD  # the attribute transformers dispatches on
        self.block = QuantizationBlock.parse({"quant_method": QUANT_METHOD, **block}, "config.json")

    def to_dict(self) -> dict:
        return self.block.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


class AtvSparseHfQuantizer(HfQuantizer):
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise AtvSparseError("atv_sparse checkpoints load from local safetensors files only")
        model_dir = Path(checkpoint_files[0]).parent
        checked = validate_checkpoint(model_dir)  # config.json on disk, the index and every header
        # what transformers will use (a config= override included), not only what is on disk
        pattern = self.quantization_config.block.pattern
        if checked.pattern != pattern:
            raise AtvSparseError(f"{model_dir / 'config.json'}: the quantization_config passed to from_pretrained "
                                 f"({pattern}) differs from the checkpoint's ({checked.pattern})")
        replace_sparse_linears(model, checked.tensors, pattern)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, SparseLinear):
                module.validate(name)
        return model

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self):
        return True  # the sparse ops are torch.library custom ops with fake implementations


def replace_sparse_linears(model: nn.Module, tensors: dict, pattern) -> list[str]:
    """Swap each ``nn.Linear`` whose ``weight_bitmask`` is in ``tensors`` for a ``SparseLinear``.

    tensors: checkpoint tensor name -> (file, safetensors header entry). Shapes are checked against
    the linear's here, so a mismatch names the tensor instead of failing inside transformers.
    """
    names = sorted(k[: -len(BITMASK_SUFFIX)] for k in tensors if k.endswith(BITMASK_SUFFIX))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        mask_key, values_key = name + BITMASK_SUFFIX, name + VALUES_SUFFIX
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise AtvSparseError(f"{mask_key} in {tensors[mask_key][0]}: the model has no module {name}") from None
        if not isinstance(linear, nn.Linear):
            raise AtvSparseError(f"{mask_key}: module {name} is a {type(linear).__name__}, not a Linear")
        if values_key not in tensors:
            raise AtvSparseError(f"{values_key}: missing from the checkpoint (its bitmask is in "
                                 f"{tensors[mask_key][0]}); the checkpoint is incomplete")
        values_info = tensors[values_key][1]
        mask_info = tensors[mask_key][1]
        out_f, in_f = linear.out_features, linear.in_features
        mask_shape, nm_values_shape = bitmask_shape(out_f, in_f), values_shape(out_f, in_f, pattern.n, pattern.m)
        if mask_info["dtype"] != "U8" or mask_info["shape"] != list(mask_shape):
            raise AtvSparseError(f"{mask_key}: expected U8 {list(mask_shape)} for a "
                                 f"({out_f} x {in_f}) linear, found {mask_info['dtype']} {mask_info['shape']}")
        num_values = values_info["shape"][0] if len(values_info["shape"]) == 1 else None
        if pattern.is_nm and values_info["shape"] != list(nm_values_shape):
            raise AtvSparseError(f"{values_key}: expected shape {list(nm_values_shape)} for "
                                 f"pattern {pattern}, found {values_info['shape']}; the checkpoint is corrupt or truncated")
        if not pattern.is_nm and num_values is None:
            raise AtvSparseError(f"{values_key}: expected a 1-D tensor for an unstructured pattern, found "
                                 f"shape {values_info['shape']}")
        sparse = SparseLinear(in_f, out_f, pattern, bias=linear.bias is not None, num_values=num_values,
                              device=linear.weight.device, dtype=linear.weight.dtype)
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, sparse)
    return names


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(AtvSparseConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(AtvSparseHfQuantizer)

