"""``AtvSparseLinearMethod``: a vLLM linear whose weight stays compressed (bitmask + values).

Parameters of a sparse linear on one tensor-parallel rank (``rows`` = the rank's output rows,
all fused parts stacked as vLLM stacks them; ``cols`` = its input columns):
- ``weight_bitmask``: (rows, ceil(cols / 8)) uint8, bit k of byte c = column 8c + k, 1 = kept;
- ``weight_values``: (rows, cols * n / m) for N:M; 1-D (kept weights, row-major) for unstructured.

Loading. N:M tensors carry vLLM's sharding attributes (``output_dim=0``, ``input_dim=1``), so
vLLM's own loaders narrow them: column-parallel and fused (qkv, gate/up) layers by rows,
row-parallel layers by whole groups of columns (``checks.check_row_split`` guarantees the cut
falls between bitmask bytes and N:M groups). An unstructured ``weight_values`` is 1-D and cannot
be narrowed; its loader keeps the whole bitmask and values of one part until both arrived, asks
vLLM's loader which rows and columns this rank holds (by loading index probes through it, so
head replication and fused offsets are vLLM's, never re-derived here) and re-packs that slice
(``slicing.slice_compressed``).

After loading, ``serving.prepare_layer`` validates every pair (popcounts, N:M groups) and keeps
the layer's plan and the layouts it needs, once: the same measured per-shape plans as
``atv_sparse.load`` (on a CPU the ``cpu`` kernels on the packed pair, no dense copy; the
reference backend where they did not build). ``apply`` is ``serving.forward``, which
builds and plans nothing per call.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ..errors import AtvSparseError
from ..formats.bitmask import bitmask_shape, validate_compressed, values_shape
from ..patterns import Pattern
from . import serving
from .checks import check_row_split
from .slicing import slice_compressed


class AtvSparseLinearMethod(LinearMethodBase):
    """Creates, loads, checks and runs one pruned linear (plain or fused) of a vLLM model."""

    def __init__(self, pattern: Pattern, prefix: str):
        super().__init__()
        self.pattern = pattern
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        check_row_split(self.prefix, input_size, input_size_per_partition, self.pattern)
        vllm_loader = extra_weight_attrs.pop("weight_loader")
        rows, cols = sum(output_partition_sizes), input_size_per_partition
        n, m = self.pattern.n, self.pattern.m
        # zeros, not empty: a part the checkpoint never filled then fails validation after loading
        bitmask = Parameter(torch.zeros(bitmask_shape(rows, cols), dtype=torch.uint8), requires_grad=False)
        layer.atv_in_features = cols
        if self.pattern.is_nm:
            values = Parameter(torch.zeros(values_shape(rows, cols, n, m), dtype=params_dtype), requires_grad=False)
            # the checkpoint's widths (all ranks' columns): what vLLM's loaders narrow
            for param, name, width in ((bitmask, "weight_bitmask", bitmask_shape(rows, input_size)[1]),
                                       (values, "weight_values", values_shape(rows, input_size, n, m)[1])):
                set_weight_attrs(param, {"output_dim": 0, "input_dim": 1,
                                         "weight_loader": _checked_loader(self.prefix, name, width, vllm_loader)})
        else:
            values = Parameter(torch.zeros(0, dtype=params_dtype), requires_grad=False)
            parts = _UnstructuredParts(self.prefix, vllm_loader, bitmask, cols, input_size)
            layer.atv_unstructured_parts = parts
            set_weight_attrs(bitmask, {"weight_loader": parts.loader("weight_bitmask")})
            set_weight_attrs(values, {"weight_loader": parts.loader("weight_values")})
        layer.register_parameter("weight_bitmask", bitmask)
        layer.register_parameter("weight_values", values)
        set_weight_attrs(bitmask, extra_weight_attrs)
        set_weight_attrs(values, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        parts = getattr(layer, "atv_unstructured_parts", None)
        if parts is not None:
            layer.weight_values.data = parts.finish(layer.weight_values.dtype)
            del layer.atv_unstructured_parts
        serving.prepare_layer(layer, layer.atv_in_features, self.pattern, self.prefix)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return serving.forward(layer, x, bias)


def _part_name(prefix: str, shard_id) -> str:
    return prefix if shard_id is None else f"{prefix} (part {shard_id!r})"


def _checked_loader(prefix: str, name: str, width: int, vllm_loader):
    """vLLM's loader, after checking the checkpoint tensor is the 2-D N:M layout it narrows."""

    def loader(param: Parameter, loaded: torch.Tensor, shard_id=None):
        if loaded.dim() != 2 or loaded.shape[1] != width:
            raise AtvSparseError(
                f"{_part_name(prefix, shard_id)}.{name}: checkpoint tensor has shape {tuple(loaded.shape)}, the "
                f"config's pattern needs (rows, {width}); the checkpoint and its quantization_config disagree")
        if name == "weight_bitmask" and loaded.dtype != torch.uint8:
            raise AtvSparseError(f"{_part_name(prefix, shard_id)}.{name}: checkpoint tensor is {loaded.dtype}, "
                                 "not uint8; the checkpoint is corrupt, re-run atv_sparse.convert")
        return vllm_loader(param, loaded) if shard_id is None else vllm_loader(param, loaded, shard_id)

    return loader


class _UnstructuredParts:
    """Collects the parts (q, k, v; gate, up; or the one weight) of an unstructured linear.

    bitmask: the layer's (rows, ceil(cols / 8)) uint8 parameter, filled part by part;
    cols: this rank's input columns; input_size: the weight's input columns on all ranks.
    """

    def __init__(self, prefix: str, vllm_loader, bitmask: Parameter, cols: int, input_size: int):
        self.prefix, self.vllm_loader, self.bitmask = prefix, vllm_loader, bitmask
        self.rows, self.cols, self.input_size = bitmask.shape[0], cols, input_size
        self.pending: dict = {}  # part id -> {"weight_bitmask": whole tensor, "weight_values": ...}
        self.placed: dict[int, torch.Tensor] = {}  # first local row -> that part's values on this rank
        self.rows_placed = 0

    def loader(self, name: str):
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None):
            got = self.pending.setdefault(shard_id, {})
            got[name] = loaded
            if len(got) == 2:  # the part's pair is complete; the whole tensors are dropped after slicing
                del self.pending[shard_id]
                self._place(got["weight_bitmask"], got["weight_values"], shard_id)

        return load

    def _probe(self, shape: tuple[int, int], index: torch.Tensor, attrs: dict, shard_id) -> torch.Tensor:
        """Load ``index`` through vLLM's loader into a -1-filled ``shape``: what this rank takes of it."""
        probe = Parameter(torch.full(shape, -1, dtype=torch.int64, device="cpu"), requires_grad=False)
        set_weight_attrs(probe, attrs)
        if shard_id is None:
            self.vllm_loader(probe, index)
        else:
            self.vllm_loader(probe, index, shard_id)
        return probe.data

    def _place(self, bitmask: torch.Tensor, values: torch.Tensor, shard_id) -> None:
        name = _part_name(self.prefix, shard_id)
        if bitmask.dim() != 2 or values.dim() != 1:
            raise AtvSparseError(f"{name}: an unstructured checkpoint needs a 2-D weight_bitmask and a 1-D "
                                 f"weight_values, found {tuple(bitmask.shape)} and {tuple(values.shape)}; the "
                                 "checkpoint and its quantization_config disagree")
        bitmask, values = bitmask.cpu(), values.cpu()  # sliced on the CPU; the layer's tensors may be on a GPU
        validate_compressed(name, bitmask, values, bitmask.shape[0], self.input_size, None, None)
        row_index = self._probe((self.rows, 1), torch.arange(bitmask.shape[0], device="cpu").view(-1, 1),
                                {"output_dim": 0}, shard_id)[:, 0]
        col_index = self._probe((1, self.cols), torch.arange(self.input_size, device="cpu").view(1, -1),
                                {"input_dim": 1, "ignore_warning": True}, shard_id)[0]
        local_rows = (row_index >= 0).nonzero()[:, 0]
        if local_rows.numel() == 0:  # nothing of this part lives on this rank
            return
        whole = local_rows.numel() == bitmask.shape[0] and self.cols == self.input_size
        if whole:  # no split (TP=1, or a part replicated on every rank): use the part as stored
            mask_part, values_part = bitmask, values
        else:
            mask_part, values_part = slice_compressed(bitmask, values, self.input_size, row_index[local_rows],
                                                      col_index)
        self.bitmask.data[local_rows.to(self.bitmask.device)] = mask_part.to(self.bitmask.device)
        self.placed[int(local_rows[0])] = values_part.clone() if whole else values_part
        self.rows_placed += local_rows.numel()

    def finish(self, dtype: torch.dtype) -> torch.Tensor:
        """This rank's values, row-major over all parts; refuses a layer with a part missing."""
        if self.pending or self.rows_placed != self.rows:
            missing = [f"{_part_name(self.prefix, s)}.{'weight_bitmask' if 'weight_values' in g else 'weight_values'}"
                       for s, g in self.pending.items()]
            raise AtvSparseError(f"layer {self.prefix}: the checkpoint lacks "
                                 f"{', '.join(missing) or f'{self.rows - self.rows_placed} output rows'}; it is "
                                 "incomplete, re-run atv_sparse.convert")
        return torch.cat([self.placed[r] for r in sorted(self.placed)]).to(self.bitmask.device, dtype)
