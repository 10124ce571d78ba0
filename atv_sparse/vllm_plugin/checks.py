"""Load-time checks of the vLLM plugin, as pure functions (no vLLM import, testable without it).

Each raises ``AtvSparseError`` naming the layer (vLLM's module name, e.g.
``model.layers.0.self_attn.qkv_proj``) before any weight is read, so a checkpoint vLLM cannot
serve is refused while the engine starts instead of failing in the middle of loading.

- ``check_block``: the ``quantization_config`` block (the strict schema of ``formats.spec``).
- ``pruned_modules_in_checkpoint``: for a local directory, the whole validation of
  ``atv_sparse.load`` (config.json, both block copies, index, every shard header), then the
  pruned modules the headers name.
- ``layer_is_sparse``: is a vLLM linear (possibly fused: ``qkv_proj`` = q + k + v) pruned? Every
  part or none; a fused group pruned in part cannot run on one kernel.
- ``check_row_split``: a row-parallel split of an N:M layer must cut the input columns at whole
  N:M groups and whole bitmask bytes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterable

from ..errors import AtvSparseError
from ..formats.validate import validate_checkpoint
from ..formats.bitmask import BITMASK_SUFFIX, VALUES_SUFFIX
from ..formats.safetensors_io import checkpoint_files
from ..formats.spec import check_quantization_config
from ..patterns import Pattern


def check_block(block: dict, where: str = "config.json") -> Pattern:
    """Validate config.json's ``quantization_config`` (every key, ``formats.spec``); return the pattern."""
    return check_quantization_config(block, where)


def pruned_modules_in_checkpoint(model_dir: str | Path) -> set[str] | None:
    """Module names (checkpoint naming) that carry ``weight_bitmask``, read from safetensors headers.

    ``None`` when ``model_dir`` is not a local directory with safetensors files (a hub id: the
    plugin then decides from the config's targets / ignore). A module with only one of the two
    tensors is refused here, naming the missing one; so is anything ``validate_checkpoint`` refuses.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return None
    try:
        checkpoint_files(path)
    except AtvSparseError:
        return None
    names = set(validate_checkpoint(path).tensors)
    masks = {n[: -len(BITMASK_SUFFIX)] for n in names if n.endswith(BITMASK_SUFFIX)}
    values = {n[: -len(VALUES_SUFFIX)] for n in names if n.endswith(VALUES_SUFFIX)}
    for module in sorted(masks ^ values):
        missing = VALUES_SUFFIX if module in masks else BITMASK_SUFFIX
        raise AtvSparseError(f"{path}: {module}{missing} is missing (its pair is there); the checkpoint is "
                             "incomplete, re-run atv_sparse.convert")
    return masks


def matches(name: str, pattern: str) -> bool:
    """A targets / ignore entry against a module name: exact, dotted suffix, ``re:REGEX`` or a class name.

    vLLM's modules are not the checkpoint's classes, so a class-name entry (``Linear``, which
    ``atv_sparse.convert`` resolves against ``torch.nn.Linear``) matches every linear here.
    """
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if pattern.endswith("Linear") and "." not in pattern:
        return True
    return name == pattern or name.endswith("." + pattern)


def selected_by_config(names: Iterable[str], targets: Iterable[str], ignore: Iterable[str]) -> bool:
    """Whether the config's targets / ignore select a module known by any of ``names``.

    names: the module's vLLM name and the checkpoint names it may come from (targets / ignore are
    written against the checkpoint's names, which vLLM renames for vision-language models).
    """
    names = list(names)
    return (any(matches(n, t) for n in names for t in targets)
            and not any(matches(n, p) for n in names for p in ignore))


def layer_is_sparse(prefix: str, parts: list[str], is_pruned: Callable[[str], bool]) -> bool:
    """Whether vLLM linear ``prefix`` is sparse; ``parts`` are its checkpoint modules' last names.

    parts: ``["q_proj", "k_proj", "v_proj"]`` for a fused ``qkv_proj``, ``[]`` for a plain linear.
    A fused group must be pruned all or nothing: one kernel runs the fused weight.
    """
    if not parts:
        return is_pruned(prefix)
    parent = prefix.rpartition(".")[0]
    names = [f"{parent}.{p}" if parent else p for p in parts]
    pruned = [is_pruned(n) for n in names]
    if any(pruned) and not all(pruned):
        sparse = ", ".join(p for p, s in zip(parts, pruned, strict=True) if s)
        dense = ", ".join(p for p, s in zip(parts, pruned, strict=True) if not s)
        raise AtvSparseError(
            f"layer {prefix}: vLLM fuses {' + '.join(parts)} into one linear, but the checkpoint prunes "
            f"{sparse} and leaves {dense} dense; prune the whole group or none of it (re-run atv_sparse.convert "
            f"with --ignore naming all of {', '.join(parts)}, or none of them)")
    return all(pruned)


def row_split_unit(pattern: Pattern) -> int:
    """Input columns per row-parallel shard must be a multiple of this: whole N:M groups and bitmask bytes."""
    return math.lcm(8, pattern.m) if pattern.is_nm else 1


def check_row_split(prefix: str, input_size: int, input_size_per_partition: int, pattern: Pattern) -> None:
    """Refuse a row-parallel split that would cut an N:M group or a bitmask byte.

    vLLM narrows ``weight_bitmask`` (bytes) and ``weight_values`` (N per group) along the input
    dimension at ``rank * shard``; that is exact only when a shard holds whole bytes and groups.
    Unstructured layers are re-packed per shard from the popcounts, so any split works.
    """
    if input_size_per_partition == input_size or not pattern.is_nm:
        return
    unit = row_split_unit(pattern)
    if input_size_per_partition % unit:
        tp = input_size // input_size_per_partition
        raise AtvSparseError(
            f"layer {prefix}: tensor parallel size {tp} splits its {input_size} input columns into shards of "
            f"{input_size_per_partition}, not a multiple of {unit} (whole {pattern} groups and 8-column bitmask "
            f"bytes); use a tensor parallel size that divides {input_size} into multiples of {unit}")
