"""A compressed-tensors sparse checkpoint opened for import or loaded directly (docs/design.md 6.1).

``open_ct(dir)`` checks config.json's compressed-tensors block, every shard header, and each
compressed layer's tensors against the model's skeleton (built on the meta device from
config.json) before any weight is read. ``python -m atv_sparse.import_ct`` streams its
translation into a new directory; ``load_compressed_tensors`` (behind ``atv_sparse.load``)
translates it into a model in memory, with no second copy on disk.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import transformers
from torch import nn

from ..errors import AtvSparseError
from ..formats import compressed_tensors as ctf
from ..formats.bitmask import BITMASK_SUFFIX, VALUES_SUFFIX, bitmask_shape
from ..formats.safetensors_io import checkpoint_files, checkpoint_tensors, data_start, read_tensor
from ..formats.validate import read_config_json
from ..models.lazy import LazyWeights, _rename_keys, materialize_buffers, return_freed_memory_to_the_system
from ..patterns import Pattern
from .hf_quantizer import replace_sparse_linears
from .sparse_linear import SparseLinear


def is_compressed_tensors_dir(path: Path) -> bool:
    """A directory whose config.json declares ``quant_method: compressed-tensors``."""
    return (Path(path) / "config.json").is_file() and ctf.is_compressed_tensors(read_config_json(path))


@dataclasses.dataclass
class CtSource:
    path: Path
    config: dict  # config.json as written
    ct: ctf.CtConfig
    model: nn.Module  # meta skeleton (dense linears)
    headers: dict[str, dict]  # model key -> safetensors header entry
    files: dict[str, tuple[Path, dict]]  # model key -> (file, entry) of the stored tensor
    order: list[str]  # model keys in file order (by shard, then by offset)
    layers: dict[str, ctf.CtLayer]
    pattern: Pattern | None
    starts: dict[Path, int] = dataclasses.field(default_factory=dict)  # file -> offset of its tensor data

    def read(self, key: str) -> torch.Tensor:
        path, info = self.files[key]
        if path not in self.starts:
            self.starts[path] = data_start(path)
        return read_tensor(path, self.starts[path], info)

    def dtype_of(self, module: str) -> torch.dtype:
        module = self.model.get_submodule(module)
        return module.weight_values.dtype if isinstance(module, SparseLinear) else module.weight.dtype

    def translated(self):
        """Groups of output tensors (model keys), in file order."""
        return ctf.iter_translated(self.headers, self.layers, self.ct, self.read, self.dtype_of, self.order)


def open_ct(path: str | Path, dtype: str | torch.dtype | None = None) -> CtSource:
    """Check ``path`` (a compressed-tensors checkpoint) without reading a weight; see the module docstring."""
    path = Path(path)
    return_freed_memory_to_the_system()  # each layer's buffers go back to the system when freed
    config = read_config_json(path)
    where = str(path / "config.json")
    ct = ctf.parse_ct_config(config, where)
    architectures = config.get("architectures") or []
    model_class = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if model_class is None:
        raise AtvSparseError(f"{where}: no transformers class for architectures {architectures}")
    hf_config = transformers.AutoConfig.from_pretrained(path)
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # transformers would send it to its compressed-tensors integration
    if dtype in (None, "auto"):
        dtype = getattr(hf_config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = model_class._from_config(hf_config, dtype=dtype)
    model.eval()
    stored = checkpoint_tensors(checkpoint_files(path))
    renamed = _rename_modules(model, stored)
    files = {renamed[k]: v for k, v in stored.items()}
    order = [renamed[k] for k, _ in sorted(stored.items(), key=lambda kv: (str(kv[1][0]), kv[1][1]["data_offsets"][0]))]
    headers = {k: info for k, (_, info) in files.items()}
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sparsity = config["quantization_config"]["sparsity_config"]
    targets = ctf.match_targets({n: [c.__name__ for c in type(m).__mro__] for n, m in model.named_modules()
                                 if isinstance(m, nn.Linear)}, sparsity.get("targets"), sparsity.get("ignore"))
    source = CtSource(path, config, ct, model, headers, files, order, {}, None)
    source.layers = ctf.plan_layers(ct, headers, source.read, linears, targets)
    source.pattern = ctf.output_pattern(ct, source.layers)
    return source


def _rename_modules(model: nn.Module, stored: dict) -> dict[str, str]:
    """Checkpoint key -> model key through transformers' renamings of legacy checkpoints, applied to the
    module part, so ``P.bitmask`` moves with ``P.weight``."""
    probes = {k: k.rpartition(".")[0] + ".weight" for k in stored}
    moved = _rename_keys(model, sorted(set(probes.values())))
    return {k: moved[probe][: -len("weight")] + k.rpartition(".")[2] for k, probe in probes.items()}


class _TranslatedWeights(LazyWeights):
    """``LazyWeights`` over translated tensors held in memory instead of shard entries: its checks
    (every tensor present, shapes equal) and its handling of tied tensors, reused."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        self.state = state
        super().__init__(model, {k: (None, {"shape": list(v.shape)}) for k, v in state.items()})

    def read(self, key: str) -> torch.Tensor:
        canonical = self._slots[self._slot_of(key)]
        name = next(n for n in self._names[canonical] if n in self.state)
        value = self.state.pop(name)
        want = self._meta[canonical].dtype
        return value if value.dtype == want else value.to(want)


def load_compressed_tensors(path: str | Path, dtype: str | torch.dtype | None = None) -> nn.Module:
    """The model of a compressed-tensors checkpoint on the CPU, its compressed linears ``SparseLinear``
    (translated and checked as the import does), every other tensor as stored."""
    source = open_ct(path, dtype)
    model = source.model
    replace_sparse_linears(model, _pair_headers(source), source.pattern)
    materialize_buffers(model)
    state: dict[str, torch.Tensor] = {}
    for group in source.translated():
        state.update(group)
    weights = _TranslatedWeights(model, state)
    weights.bring(model, torch.device("cpu"))
    if weights.state:
        extra = sorted(weights.state)
        raise AtvSparseError(f"{source.path}: tensor {extra[0]}: the model has no parameter of that name "
                             f"({len(extra)} such tensor(s)); the checkpoint does not match its config.json")
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            module.validate(name)
    return model


def _pair_headers(source: CtSource) -> dict[str, tuple[None, dict]]:
    """Header-like entries of the translated pairs, for ``replace_sparse_linears``."""
    entries = {}
    for name, layer in source.layers.items():
        values = [layer.out_features, layer.in_features // 2] if source.pattern.is_nm else [layer.kept]
        entries[name + BITMASK_SUFFIX] = (None, {"dtype": "U8", "shape": list(bitmask_shape(layer.out_features,
                                                                                             layer.in_features))})
        entries[name + VALUES_SUFFIX] = (None, {"dtype": "?", "shape": values})
    return entries
