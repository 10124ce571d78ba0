"""compressed-tensors sparse checkpoints read, checked and translated into this package's format
(docs/design.md 6.1).

llm-compressor (up to 0.13) wrote 2:4 and unstructured models in the compressed-tensors format
(``quantization_config.quant_method = "compressed-tensors"``). For a compressed linear ``P``
(``P.weight`` of shape (out, in)) a shard holds, instead of ``P.weight``:

==================  ==========================  ==============================================
tensor              sparse-24-bitmask           sparse-bitmask
==================  ==========================  ==============================================
``P.shape``         int64 (2, 1): [out, in]     int64 (2,): [out, in]
``P.compressed``    (out, in / 2), kept values  (n_kept,), kept values, row-major
``P.bitmask``       uint8 (out, ceil(in / 8))   uint8 (out, ceil(in / 8))
``P.row_offsets``   absent                      int64 (out,): index of each row's first value
==================  ==========================  ==============================================

The bitmask is ``numpy.packbits(keep, axis=-1, bitorder="little")``: the same bytes as this
package's ``weight_bitmask`` (``formats.bitmask``). sparse-24-bitmask keeps the 2 largest
magnitudes of every 4 (a kept value may be 0); sparse-bitmask keeps the non-zeros. A ``dense``
format with ``sparsity_structure: "2:4"`` stores ``P.weight`` itself, zeros included.

Quantized variants keep the quantized values in ``P.compressed`` (or ``P.weight``) beside
``P.weight_scale`` (and ``P.weight_zero_point`` when asymmetric). ``float-quantized`` (FP8
E4M3), ``int-quantized`` and ``naive-quantized`` are dequantized here, as compressed-tensors
dequantizes them (``(q - zero_point) * scale`` in the scale's dtype, cast to the model's dtype),
for scales per tensor, channel, group or block; every other scheme (``pack-quantized`` INT4,
``marlin-24``, NVFP4 / MXFP4, activation-ordered groups) is refused with an error naming it.

The functions here only see tensors; reading them from files is the caller's (``read``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator

import torch

from ..errors import AtvSparseError
from ..patterns import Pattern, parse_pattern
from .bitmask import BITMASK_SUFFIX, VALUES_SUFFIX, bitmask_shape, pack_bitmask, unpack_bitmask, validate_compressed
from .spec import FORMAT_NAME, FORMAT_VERSION, QuantizationBlock

CT_QUANT_METHOD = "compressed-tensors"
SPARSE_FORMATS = ("sparse-24-bitmask", "sparse-bitmask", "dense")
DEQUANTIZED_FORMATS = ("float-quantized", "int-quantized", "naive-quantized")
# Quantization tensors of a module that a dequantized import no longer needs (activation and KV-cache
# quantization included: atv-sparse runs activations in the model's dtype).
QUANT_PARAMS = ("weight_scale", "weight_zero_point", "input_scale", "input_zero_point", "output_scale",
                "output_zero_point", "k_scale", "v_scale", "q_scale")
# Tensors of schemes that are never dequantized here.
REFUSED_PARAMS = {"weight_packed": "pack-quantized", "weight_g_idx": "activation-ordered (actorder)",
                  "weight_global_scale": "nvfp4-pack-quantized", "scale_packed": "marlin-24",
                  "meta": "marlin-24"}
_CT_SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")
_HINT = "the checkpoint is corrupt or truncated; download or export it again"
_INT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64")

Reader = Callable[[str], torch.Tensor]


def is_compressed_tensors(config: dict) -> bool:
    """Does config.json (parsed) declare ``quant_method: compressed-tensors``?"""
    block = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(block, dict) and block.get("quant_method") == CT_QUANT_METHOD


@dataclasses.dataclass(frozen=True)
class CtConfig:
    """What config.json's compressed-tensors block declares, checked."""

    sparsity_format: str  # one of SPARSE_FORMATS
    structure: str  # "2:4" or "unstructured"
    quant_formats: tuple[str, ...]  # the quantization formats named (empty: not quantized)
    quant_summary: str  # one line for the report, "" when not quantized
    version: str | None

    @property
    def pattern_nm(self) -> bool:
        return self.structure == "2:4"


def parse_ct_config(config: dict, where: str) -> CtConfig:
    """Check config.json's compressed-tensors block; refuse what cannot be imported, naming it."""
    block = config["quantization_config"]
    sparsity = block.get("sparsity_config") or None
    if sparsity is None:
        raise AtvSparseError(f"{where}: quantization_config has no sparsity_config: a quantized model without "
                             "sparsity; atv_sparse imports sparse compressed-tensors checkpoints only")
    if not isinstance(sparsity, dict):
        raise AtvSparseError(f"{where}: quantization_config.sparsity_config is not a JSON object")
    fmt = sparsity.get("format")
    if fmt not in SPARSE_FORMATS:
        raise AtvSparseError(f"{where}: sparsity_config.format {fmt!r} is not supported; atv_sparse imports "
                             f"{', '.join(SPARSE_FORMATS)}")
    raw = sparsity.get("sparsity_structure")
    structure = "unstructured" if raw is None else str(raw).lower()
    if structure not in ("2:4", "unstructured"):
        raise AtvSparseError(f"{where}: sparsity_config.sparsity_structure {raw!r} is not supported; expected "
                             "'2:4' or 'unstructured'")
    if fmt == "sparse-24-bitmask" and structure != "2:4":
        raise AtvSparseError(f"{where}: sparsity_config.format sparse-24-bitmask with sparsity_structure "
                             f"{raw!r}; that format holds 2:4 only")
    if fmt == "dense" and structure != "2:4":
        raise AtvSparseError(f"{where}: sparsity_config.format dense with sparsity_structure {raw!r}: dense "
                             "weights with no declared N:M structure; nothing to import (prune it with "
                             "python -m atv_sparse.convert instead)")
    formats, parts = _quant_formats(block, where)
    version = block.get("version")
    return CtConfig(fmt, structure, formats, "; ".join(parts), version if isinstance(version, str) else None)


def _quant_formats(block: dict, where: str) -> tuple[tuple[str, ...], list[str]]:
    groups = block.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise AtvSparseError(f"{where}: quantization_config.config_groups is not a JSON object")
    formats, parts = [], []
    for name, group in sorted(groups.items()):
        weights = (group or {}).get("weights") if isinstance(group, dict) else None
        if not weights:
            continue
        fmt = group.get("format") or block.get("format")
        if fmt not in DEQUANTIZED_FORMATS:
            raise AtvSparseError(f"{where}: quantization_config.config_groups.{name}: weight quantization format "
                                 f"{fmt!r} is not supported; atv_sparse dequantizes {', '.join(DEQUANTIZED_FORMATS)} "
                                 "at import and refuses the others (INT4 pack-quantized, marlin-24, NVFP4, MXFP4)")
        if weights.get("actorder") not in (None, False):
            raise AtvSparseError(f"{where}: quantization_config.config_groups.{name}: activation-ordered groups "
                                 f"(actorder {weights['actorder']!r}) are not supported")
        formats.append(fmt)
        kind = f"{weights.get('type', '?')}{weights.get('num_bits', '?')}"
        parts.append(f"{name}: {fmt} weights {kind} per {weights.get('strategy', '?')}"
                     + ("" if weights.get("symmetric", True) else " asymmetric"))
        acts = group.get("input_activations")
        if acts:
            parts[-1] += (f", input activations {acts.get('type', '?')}{acts.get('num_bits', '?')} "
                          f"{'dynamic' if acts.get('dynamic') else 'static'} (not applied: atv_sparse runs "
                          "activations in the model's dtype)")
    return tuple(dict.fromkeys(formats)), parts


@dataclasses.dataclass
class CtLayer:
    """One compressed linear: its module name and the checkpoint names of its tensors."""

    name: str
    kind: str  # "sparse-24-bitmask" | "sparse-bitmask" | "dense" (a weight declared 2:4) | "plain" (not sparse)
    out_features: int
    in_features: int
    tensors: dict[str, str]  # role ("shape", "compressed", "bitmask", "row_offsets", "weight", "weight_scale", ...) -> key
    kept: int  # number of values stored (dense: out * in)


def plan_layers(ct: CtConfig, headers: dict[str, dict], read: Reader, linears: dict[str, tuple[int, int]],
                targets: set[str]) -> dict[str, CtLayer]:
    """Module name -> ``CtLayer`` for every compressed linear, checked from the headers (and the tiny
    ``.shape`` tensors) before any weight is read.

    headers: checkpoint key -> safetensors header entry. linears: every ``nn.Linear`` of the model
    skeleton, name -> (out, in). targets: the linears config.json's sparsity targets / ignore select
    (used by the dense format, whose weights carry no marker).
    """
    for key in headers:
        for param, scheme in REFUSED_PARAMS.items():
            if key.endswith("." + param):
                raise AtvSparseError(f"tensor {key}: a {scheme} weight; atv_sparse cannot dequantize this scheme "
                                     "(supported: " + ", ".join(DEQUANTIZED_FORMATS) + ")")
    layers: dict[str, CtLayer] = {}
    if ct.sparsity_format == "dense":
        for name in sorted(targets):
            key = f"{name}.weight"
            if key not in headers:
                raise AtvSparseError(f"tensor {key}: absent from the checkpoint, but sparsity_config targets {name}")
            out_f, in_f = linears[name]
            _check_entry(key, headers[key], [out_f, in_f], None)
            layers[name] = CtLayer(name, "dense", out_f, in_f, _quant_roles(name, headers, {"weight": key}), out_f * in_f)
        return layers
    for key in sorted(headers):
        if not key.endswith(".bitmask"):
            continue
        name = key[: -len(".bitmask")]
        roles = {role: f"{name}.{role}" for role in _CT_SUFFIXES if f"{name}.{role}" in headers}
        needed = ("shape", "compressed", "bitmask") + (("row_offsets",) if ct.sparsity_format == "sparse-bitmask" else ())
        for role in needed:
            if role not in roles:
                raise AtvSparseError(f"tensor {name}.{role}: missing; a {ct.sparsity_format} layer needs "
                                     f"{', '.join('.' + r for r in needed)} (its .bitmask is present); {_HINT}")
        if ct.sparsity_format == "sparse-24-bitmask" and "row_offsets" in roles:
            raise AtvSparseError(f"tensor {roles['row_offsets']}: a sparse-bitmask tensor in a checkpoint whose "
                                 f"sparsity_config.format is sparse-24-bitmask; {_HINT}")
        if name not in linears:
            raise AtvSparseError(f"tensor {key}: the model has no linear layer {name}; the checkpoint does not "
                                 "match its config.json")
        out_f, in_f = linears[name]
        shape = _read_shape(roles["shape"], headers[roles["shape"]], read)
        if shape != [out_f, in_f]:
            raise AtvSparseError(f"tensor {roles['shape']}: says the weight is {shape}, but the model's {name} is "
                                 f"[{out_f}, {in_f}]; {_HINT}")
        _check_entry(roles["bitmask"], headers[roles["bitmask"]], list(bitmask_shape(out_f, in_f)), "U8")
        comp = headers[roles["compressed"]]
        if ct.sparsity_format == "sparse-24-bitmask":
            if in_f % 4:
                raise AtvSparseError(f"tensor {roles['compressed']}: {name} has {in_f} input columns, not a "
                                     "multiple of 4, so it cannot be 2:4")
            _check_entry(roles["compressed"], comp, [out_f, in_f // 2], None)
            kept = out_f * in_f // 2
        else:
            if len(comp["shape"]) != 1:
                raise AtvSparseError(f"tensor {roles['compressed']}: expected a 1-D tensor of kept values, found "
                                     f"shape {comp['shape']}; {_HINT}")
            kept = comp["shape"][0]
            offsets = headers[roles["row_offsets"]]
            if offsets["dtype"] not in _INT_DTYPES or offsets["shape"] != [out_f]:
                raise AtvSparseError(f"tensor {roles['row_offsets']}: expected an integer tensor of shape [{out_f}], "
                                     f"found {offsets['dtype']} {offsets['shape']}; {_HINT}")
        layers[name] = CtLayer(name, ct.sparsity_format, out_f, in_f, _quant_roles(name, headers, roles), kept)
    if not layers:
        raise AtvSparseError(f"no tensor ends in .bitmask although sparsity_config.format is {ct.sparsity_format}; "
                             "the checkpoint holds no compressed layer")
    return layers


def _quant_roles(name: str, headers: dict, roles: dict[str, str]) -> dict[str, str]:
    for param in ("weight_scale", "weight_zero_point"):
        if f"{name}.{param}" in headers:
            roles[param] = f"{name}.{param}"
    values = roles.get("compressed", roles.get("weight"))
    if headers[values]["dtype"] in ("F8_E4M3", "F8_E5M2", "I8", "U8", "I32") and "weight_scale" not in roles:
        raise AtvSparseError(f"tensor {values}: quantized values ({headers[values]['dtype']}) without "
                             f"{name}.weight_scale; {_HINT}")
    return roles


def _check_entry(key: str, info: dict, shape: list[int], dtype: str | None) -> None:
    if info["shape"] != shape or (dtype is not None and info["dtype"] != dtype):
        want = f"{dtype + ' ' if dtype else ''}{shape}"
        raise AtvSparseError(f"tensor {key}: expected {want}, found {info['dtype']} {info['shape']}; {_HINT}")


def _read_shape(key: str, info: dict, read: Reader) -> list[int]:
    if info["dtype"] not in _INT_DTYPES or _numel(info["shape"]) != 2:
        raise AtvSparseError(f"tensor {key}: expected 2 integers [out, in], found {info['dtype']} {info['shape']}; {_HINT}")
    return [int(v) for v in read(key).reshape(-1).tolist()]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def match_targets(modules: dict[str, list[str]], targets: list[str] | None, ignore: list[str] | None) -> set[str]:
    """Module names matched as compressed-tensors matches them (``utils/match.py``): a target is an exact
    module name, ``re:`` + a regex matched at the start of the name, or the name of one of the
    module's classes. modules: name -> its class names (MRO)."""
    def hit(name: str, classes: list[str], patterns) -> bool:
        for p in patterns or ():
            if p.startswith("re:"):
                if re.match(p[3:], name):
                    return True
            elif p == name or p in classes:
                return True
        return False

    return {n for n, c in modules.items() if hit(n, c, targets) and not hit(n, c, ignore)}


def translate_layer(layer: CtLayer, ct: CtConfig, read: Reader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One compressed linear as this package's ``weight_bitmask`` + ``weight_values`` (2:4: (out, in / 2);
    unstructured: 1-D), every value checked against the declared structure, dequantized to ``dtype``
    when quantized. Errors name the source tensor."""
    t = {role: read(key) for role, key in layer.tensors.items() if role != "shape"}
    out_f, in_f, name = layer.out_features, layer.in_features, layer.name
    if layer.kind == "dense":
        dense = t["weight"]
        keep = dense.view(torch.int8) != 0 if dense.dtype == torch.float8_e4m3fn else dense != 0
        where = f"{name}.weight"
    else:
        keep = unpack_bitmask(t["bitmask"], -(-in_f // 8) * 8)
        if in_f % 8 and keep[:, in_f:].any():
            raise AtvSparseError(f"tensor {layer.tensors['bitmask']}: bits set past column {in_f}; {_HINT}")
        keep = keep[:, :in_f]
        popcount = int(keep.sum())
        if popcount != layer.kept:
            raise AtvSparseError(f"tensor {layer.tensors['bitmask']}: keeps {popcount} weights but "
                                 f"{layer.tensors['compressed']} holds {layer.kept} values; {_HINT}")
        if layer.kind == "sparse-bitmask":
            counts = keep.sum(dim=1)
            want = torch.cumsum(counts, 0) - counts
            offsets = t["row_offsets"].to(torch.int64)
            if not torch.equal(offsets, want):
                row = int((offsets != want).nonzero()[0])
                raise AtvSparseError(f"tensor {layer.tensors['row_offsets']}: row {row} starts at value "
                                     f"{int(offsets[row])}, the bitmask puts it at {int(want[row])}; {_HINT}")
        where = layer.tensors["bitmask"]
        if layer.kind == "sparse-24-bitmask" and "weight_scale" not in t:  # the same bytes: checked, then kept
            _fill_2_4(keep, where, strict=True)
            return {name + BITMASK_SUFFIX: t["bitmask"], name + VALUES_SUFFIX: t["compressed"].to(dtype)}
        dense = _scatter(keep, t["compressed"])
    if "weight_scale" in t:
        dense = _dequantize(dense, t["weight_scale"], t.get("weight_zero_point"), layer)
    dense = dense.to(dtype)
    if not ct.pattern_nm:
        return {name + BITMASK_SUFFIX: pack_bitmask(keep), name + VALUES_SUFFIX: dense[keep]}
    keep = _fill_2_4(keep, where, strict=layer.kind == "sparse-24-bitmask")
    bitmask, values = pack_bitmask(keep), dense[keep].reshape(out_f, in_f // 2)
    validate_compressed(name, bitmask, values, out_f, in_f, 2, 4)  # our own invariants, once more
    return {name + BITMASK_SUFFIX: bitmask, name + VALUES_SUFFIX: values}


def _scatter(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(out, in) with ``values`` (row-major) at the kept positions, zeros elsewhere; FP8 moved as bytes."""
    raw = values.view(torch.uint8) if values.element_size() == 1 and values.is_floating_point() else values
    dense = torch.zeros(keep.shape, dtype=raw.dtype)
    dense[keep] = raw.reshape(-1)
    return dense.view(values.dtype)


def _fill_2_4(keep: torch.Tensor, where: str, strict: bool) -> torch.Tensor:
    """``keep`` with exactly 2 of every 4 columns kept per row: groups holding fewer (a zero weight
    was not stored) get their first unkept columns, which hold zeros; ``strict`` (a 2:4 bitmask as
    written) refuses any group that is not exactly 2. A group above 2 is always refused."""
    out_f, in_f = keep.shape
    if in_f % 4:
        raise AtvSparseError(f"tensor {where}: {in_f} input columns, not a multiple of 4, so it cannot be 2:4")
    groups = keep.reshape(out_f, in_f // 4, 4)
    counts = groups.sum(-1, dtype=torch.uint8)
    bad = (counts != 2).nonzero() if strict else (counts > 2).nonzero()
    if len(bad):
        row, group = bad[0].tolist()
        raise AtvSparseError(f"tensor {where}: row {row}, columns {group * 4}..{group * 4 + 3} keep "
                             f"{int(counts[row, group])} weights; sparsity_structure 2:4 allows 2 of every 4 "
                             f"({len(bad)} such group(s)); the weights are not 2:4")
    if strict or bool((counts == 2).all()):
        return keep
    # the k-th unkept column of a group (k = 1, 2) becomes kept while the group still lacks k
    missing = (2 - counts).unsqueeze(-1)
    rank = torch.cumsum(~groups, dim=-1, dtype=torch.uint8)
    return (groups | (~groups & (rank <= missing))).reshape(out_f, in_f)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, layer: CtLayer) -> torch.Tensor:
    """compressed-tensors' ``_dequantize``: ``(q - zero_point) * scale`` in the scale's dtype, with a
    scale per tensor ((), (1,), (1, 1)), channel ((out, 1)), group ((out, in / g)) or block."""
    out_f, in_f = q.shape
    if scale.dim() > 2 or scale.numel() == 0:
        raise AtvSparseError(f"tensor {layer.name}.weight_scale: shape {list(scale.shape)} is no scale layout "
                             f"compressed-tensors writes; {_HINT}")
    s2 = scale.reshape(1, 1) if scale.dim() < 2 and scale.numel() == 1 else scale.reshape(-1, 1) if scale.dim() < 2 else scale
    rows, cols = s2.shape
    if out_f % rows or in_f % cols:
        raise AtvSparseError(f"tensor {layer.name}.weight_scale: shape {list(scale.shape)} does not tile the "
                             f"({out_f} x {in_f}) weight; {_HINT}")

    def expand(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(rows, cols)
        return t.repeat_interleave(out_f // rows, 0).repeat_interleave(in_f // cols, 1)

    value = q.to(scale.dtype)
    if zero_point is not None:
        if zero_point.numel() != scale.numel():
            raise AtvSparseError(f"tensor {layer.name}.weight_zero_point: {zero_point.numel()} entries for "
                                 f"{scale.numel()} scales; {_HINT}")
        value = value - expand(zero_point.to(scale.dtype))
    return value * expand(scale)


def translated_block(ct: CtConfig, pattern: Pattern, layers: list[str], library_version: str) -> dict:
    """The ``quantization_config`` block of the imported checkpoint (``formats.spec``)."""
    settings = {"source_quant_method": CT_QUANT_METHOD, "source_format": ct.sparsity_format,
                "source_sparsity_structure": ct.structure, "source_version": ct.version}
    if ct.quant_formats:
        settings["dequantized"] = ct.quant_summary
    return QuantizationBlock(pattern, FORMAT_VERSION, FORMAT_NAME, pattern.sparsity, "compressed-tensors", settings,
                             tuple(layers), (), library_version).to_dict()


def output_pattern(ct: CtConfig, layers: dict[str, CtLayer]) -> Pattern:
    """2:4, or for unstructured the mean sparsity over the compressed layers (what the block records)."""
    if ct.pattern_nm:
        return parse_pattern("2:4")
    total = sum(l.out_features * l.in_features for l in layers.values())
    kept = sum(l.kept for l in layers.values())
    sparsity = min(max(1 - kept / max(total, 1), 1e-6), 1 - 1e-6)
    return parse_pattern("unstructured", round(sparsity, 6))


def translated_config(config: dict, block: dict) -> dict:
    """config.json with the compressed-tensors block replaced by ``block`` (also in ``text_config``,
    where a vision-language model's language model reads it)."""
    config = dict(config)
    config["quantization_config"] = block
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {**config["text_config"], "quantization_config": block}
    return config


def dropped_keys(headers: dict[str, dict], layers: dict[str, CtLayer]) -> list[str]:
    """Quantization tensors with no place in the imported model (scales of dequantized weights,
    activation and KV-cache scales)."""
    used = {k for layer in layers.values() for k in layer.tensors.values()}
    return sorted(k for k in headers if k not in used and k.rpartition(".")[2] in QUANT_PARAMS)


def iter_translated(headers: dict[str, dict], layers: dict[str, CtLayer], ct: CtConfig, read: Reader,
                    dtype_of: Callable[[str], torch.dtype], order: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Groups of output tensors in ``order`` (checkpoint keys): a compressed linear's pair together,
    every other tensor as stored, quantization tensors dropped. A dense weight with a scale that no
    compressed layer owns is dequantized too. dtype_of(module name): the dtype of its values."""
    by_key = {k: layer for layer in layers.values() for k in layer.tensors.values()}
    done, skip = set(), set(dropped_keys(headers, layers))
    for key in order:
        if key in skip or key in done:
            continue
        layer = by_key.get(key)
        if layer is not None:
            done.update(layer.tensors.values())
            yield translate_layer(layer, ct, read, dtype_of(layer.name))
            continue
        module = key.rpartition(".")[0]
        if key.endswith(".weight") and f"{module}.weight_scale" in headers:
            dense = CtLayer(module, "plain", 0, 0, {"weight_scale": f"{module}.weight_scale"}, 0)  # for messages
            zp = f"{module}.weight_zero_point"
            value = _dequantize(read(key), read(f"{module}.weight_scale"), read(zp) if zp in headers else None, dense)
            yield {key: value.to(dtype_of(module))}
            continue
        yield {key: read(key)}
