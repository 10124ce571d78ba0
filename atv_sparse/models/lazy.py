"""A model skeleton whose weights stay in the checkpoint until a phase needs them (docs/design.md 3).

    model, weights = open_lazy(adapter, ckpt, dtype)   meta skeleton; every shard header checked
    weights.bring(model.model.layers[3], device)       block 3's tensors read from their shards
    weights.free(model.model.layers[3])                back to meta: the memory is returned

``open_lazy`` builds the model on the meta device (no weight allocated), gives its non-persistent
buffers (RoPE frequencies, position ids) real values exactly as ``from_pretrained`` does (empty
CPU tensors, then the model's own ``initialize_weights``), and checks, before any work, that
every parameter and persistent buffer is in the checkpoint with its shape. The checkpoint's files
are read through ``formats.safetensors_io``: its ``checkpoint_tensors`` (every header checked once:
a shard named in the index but missing, a tensor absent from the shard the index names, a tensor
in two shards, a truncated shard; a caller that has it already passes it in) and its
``read_tensor`` (plain reads into a fresh buffer, no memory map). ``LazyWeights`` is a
``prune.walk.Residency``. Values get the dtype of the skeleton's parameter
(``from_pretrained``'s cast), so a model brought whole equals the one ``from_pretrained`` loads,
bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import AtvSparseError
from ..formats.safetensors_io import checkpoint_files, checkpoint_tensors, data_start, read_tensor


def _rename_keys(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> model key, through the key renamings ``from_pretrained`` applies (legacy LLaVA
    checkpoints name ``language_model.model.layers...``); identity when transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return {n: n for n in names}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    out = {}
    for name in names:
        new, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if converter is not None and any(converter in c.source_patterns for c in converters):
            raise AtvSparseError(f"tensor {name}: this checkpoint stores it in a layout transformers converts on "
                                 "load (merged or split tensors); save the model with save_pretrained first")
        out[name] = new
    return out


def materialize_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (not in any checkpoint) computed as ``from_pretrained`` computes them."""
    for p in model.parameters():
        p._is_hf_initialized = True  # initialize_weights then touches buffers only
    for key, buf in list(model.named_non_persistent_buffers()):
        owner, _, attr = key.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = torch.empty_like(buf, device="cpu")
    model.initialize_weights()


class LazyWeights:
    """Parameters and persistent buffers of a meta skeleton, read from the checkpoint on ``bring``.

    Tied tensors (lm_head and the embeddings) are one slot: bringing either brings both.
    ``live()`` lists the state-dict names currently materialised (tests count them).
    """

    def __init__(self, model: nn.Module, sources: dict[str, tuple[Path, dict]]):
        self.model = model
        self._slots: dict[tuple[int, str], str] = {}  # (id(owner module), attribute) -> canonical name
        self._owners: dict[str, list[tuple[nn.Module, str, bool]]] = {}
        self._names: dict[str, list[str]] = {}
        self._meta: dict[str, torch.Tensor] = {}
        self._source: dict[str, tuple[Path, dict]] = {}
        self._live: set[str] = set()
        self._starts: dict[Path, int] = {}
        by_identity: dict[int, str] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            entries = [(a, t, True) for a, t in mod._parameters.items() if t is not None]
            entries += [(a, t, False) for a, t in mod._buffers.items()
                        if t is not None and a not in mod._non_persistent_buffers_set]
            for attr, tensor, is_param in entries:
                key = f"{mod_name}.{attr}" if mod_name else attr
                canonical = by_identity.setdefault(id(tensor), key)
                self._slots[(id(mod), attr)] = canonical
                self._owners.setdefault(canonical, []).append((mod, attr, is_param))
                self._names.setdefault(canonical, []).append(key)
                self._meta[canonical] = tensor
                if key in sources and canonical not in self._source:
                    self._source[canonical] = sources[key]
        for canonical, tensor in self._meta.items():
            if canonical not in self._source:
                raise AtvSparseError(f"tensor {' / '.join(self._names[canonical])} is absent from the checkpoint; it is incomplete "
                                     "or made for another model class")
            path, info = self._source[canonical]
            if list(info["shape"]) != list(tensor.shape):
                raise AtvSparseError(f"{path}: tensor {canonical} has shape {info['shape']}, the model expects "
                                     f"{list(tensor.shape)}; the checkpoint does not match its config.json")

    def _slot_of(self, key: str) -> tuple[int, str]:
        owner, _, attr = key.rpartition(".")
        return id(self.model.get_submodule(owner)), attr

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a state-dict name) as the skeleton holds it (its dtype), from the file."""
        canonical = self._slots[self._slot_of(key)]
        path, info = self._source[canonical]
        if path not in self._starts:
            self._starts[path] = data_start(path)
        value = read_tensor(path, self._starts[path], info)
        want = self._meta[canonical].dtype
        return value if value.dtype == want else value.to(want)

    def _keys_under(self, module: nn.Module, skip: Iterable[nn.Module]) -> list[str]:
        skipped = {id(m) for s in skip for m in s.modules()}
        keys = []
        for mod in module.modules():
            if id(mod) in skipped:
                continue
            for attr in list(mod._parameters) + list(mod._buffers):
                canonical = self._slots.get((id(mod), attr))
                if canonical is not None and canonical not in keys:
                    keys.append(canonical)
        return keys

    def bring(self, module: nn.Module, device: torch.device, skip: Iterable[nn.Module] = ()) -> None:
        for key in self._keys_under(module, skip):
            owners = self._owners[key]
            first_mod, first_attr, is_param = owners[0]
            current = (first_mod._parameters if is_param else first_mod._buffers)[first_attr]
            if key in self._live:
                if current.device == torch.device(device):
                    continue
                value = current.data.to(device)
            else:
                value = self.read(key).to(device)
            self._assign(key, nn.Parameter(value, requires_grad=self._meta[key].requires_grad) if is_param else value)
            self._live.add(key)

    def free(self, module: nn.Module) -> None:
        for key in self._keys_under(module, ()):
            if key in self._live:
                self._assign(key, self._meta[key])
                self._live.discard(key)

    def _assign(self, key: str, value: torch.Tensor) -> None:
        for mod, attr, is_param in self._owners[key]:
            (mod._parameters if is_param else mod._buffers)[attr] = value

    def live(self) -> set[str]:
        return set(self._live)


def return_freed_memory_to_the_system() -> None:
    """Make glibc give a freed block's memory back to the system.

    glibc serves an allocation above its mmap threshold with its own mapping, returned on free;
    but each such free *raises* the threshold (up to 32 MB), so the next block's tensors come from
    the heap, where freed memory stays with the process: measured on a Llama-3.2-1B shape, resident
    memory then grew by ~0.1 GB per block. Setting the threshold explicitly turns that adjustment
    off. No effect (and no error) outside glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def open_lazy(model_class: type, config, model_dir: Path, dtype: torch.dtype,
              tensors: dict[str, tuple[Path, dict]] | None = None) -> tuple[nn.Module, LazyWeights]:
    """(meta skeleton in eval mode, its LazyWeights). tensors: ``checkpoint_tensors`` of ``model_dir``
    (tensor name -> (file, header entry)) when the caller has read it; else every header is read
    and checked here."""
    return_freed_memory_to_the_system()
    sources = tensors if tensors is not None else checkpoint_tensors(checkpoint_files(model_dir))
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=dtype)
    model.eval()
    materialize_buffers(model)
    renamed = _rename_keys(model, sources)
    return model, LazyWeights(model, {renamed[k]: v for k, v in sources.items()})


__all__ = ["LazyWeights", "materialize_buffers", "open_lazy"]
