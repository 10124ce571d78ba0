"""Which backend runs a sparse linear, per token count (docs/design.md 7.1).

The backends and what each needs are one table, ``atv_sparse.ops.backends.TABLE``: ``cuda`` (csrc
decode kernels, few tokens), ``triton`` (skinny kernel up to 64 tokens, tile GEMM above),
``cusparselt`` (2:4 sparse tensor cores, large M), ``cpu`` (C++ kernels on the packed pair, every M
on a CPU), ``reference`` (decompress + ``F.linear``: any
device, dtype and pattern), and, inside a plan only, ``dense`` (a dense copy of the weight through
cuBLAS, kept only where it measured faster than every sparse kernel). This module only reads it.

A ``Plan`` holds one backend (and cuSPARSELt algorithm id) per token bucket: a call with M
tokens uses the entry of the smallest bucket >= M. Plans come from a per-shape table measured
once on the device (``atv_sparse.ops.autotune``) and cached in a JSON file, or from
``heuristic_plan`` when nothing was measured.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AtvSparseError
from .backends import BACKENDS, FACTS, KERNEL_BACKENDS, KERNEL_DTYPES, TOKEN_LIMITS, facts  # noqa: F401  (re-exported)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)


def bucket_index(tokens: int) -> int:
    """Index of the smallest bucket >= tokens (the last bucket for anything larger).

    A plain loop rather than ``bisect``: torch.compile traces it (and guards on the bucket)."""
    for i, upper in enumerate(BUCKETS):
        if tokens <= upper:
            return i
    return len(BUCKETS) - 1


@dataclass(frozen=True)
class Plan:
    """backends[i] (and alg_ids[i] for cuSPARSELt, else -1) serve token counts in bucket i.

    A cuSPARSELt entry always holds an id >= 0: torch passes the id to cuSPARSELt unconditionally
    (CUSPARSELT_MATMUL_ALG_CONFIG_ID), whose valid ids start at 0."""

    backends: tuple[str, ...]
    alg_ids: tuple[int, ...]

    @classmethod
    def uniform(cls, backend: str) -> "Plan":
        return cls((backend,) * len(BUCKETS), (0 if backend == "cusparselt" else -1,) * len(BUCKETS))

    def __post_init__(self):
        bad = [i for i, (b, a) in enumerate(zip(self.backends, self.alg_ids)) if b == "cusparselt" and a < 0]
        if bad:
            raise AtvSparseError(f"Plan: cuSPARSELt needs an algorithm id >= 0, entry {bad[0]} has {self.alg_ids[bad[0]]}")

    def pick(self, tokens: int) -> tuple[str, int]:
        i = bucket_index(tokens)
        return self.backends[i], self.alg_ids[i]

    def summary(self) -> str:
        """e.g. ``triton<=64,cusparselt>64``."""
        parts, start = [], 0
        for i in range(1, len(BUCKETS) + 1):
            if i == len(BUCKETS) or self.backends[i] != self.backends[start]:
                if i == len(BUCKETS):
                    parts.append(self.backends[start] + (f">{BUCKETS[start - 1]}" if start else ""))
                else:
                    parts.append(f"{self.backends[start]}<={BUCKETS[i - 1]}")
                start = i
        return ",".join(parts)


def machine_status(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device`` on this machine, else why not."""
    return facts(backend).machine(device)


def layer_status(backend: str, n: int | None, m: int | None, dtype: torch.dtype, out_features: int,
                 in_features: int) -> str | None:
    """None when a layer of this pattern, dtype and shape suits ``backend``, else why not."""
    return facts(backend).layer(n, m, dtype, out_features, in_features)


def usable_backends(device: torch.device, n: int | None, m: int | None, dtype: torch.dtype,
                    out_features: int, in_features: int) -> list[str]:
    """Kernel backends that can run this layer on ``device``, in preference order."""
    return [b for b in KERNEL_BACKENDS if machine_status(b, device) is None
            and layer_status(b, n, m, dtype, out_features, in_features) is None]


def heuristic_plan(usable: list[str], dense_fallback: bool) -> Plan:
    """What to run when nothing was measured, per bucket: the first usable kernel (in the table's
    order) preferred up to that many tokens (``Backend.heuristic_tokens``); else dense (if allowed
    and any kernel is usable); else the first usable kernel without a token limit; else reference.
    On a GPU with every kernel: ``cuda`` up to 4 tokens, ``triton`` up to 64, ``cusparselt`` above."""
    kernels = [FACTS[b] for b in KERNEL_BACKENDS if b in usable]
    backends = []
    for tokens in BUCKETS:
        preferred = [b.name for b in kernels if b.heuristic_tokens is None or tokens <= b.heuristic_tokens]
        unlimited = [b.name for b in kernels if b.token_limit is None]
        if preferred:
            backends.append(preferred[0])
        elif kernels and dense_fallback:
            backends.append("dense")
        else:
            backends.append(unlimited[0] if unlimited else "reference")
    return Plan(tuple(backends), tuple(0 if b == "cusparselt" else -1 for b in backends))


# --- the measured table: one JSON file per device and software stack -------------------------------

def table_key(n: int, m: int, dtype: torch.dtype, out_features: int, in_features: int, gated: bool) -> str:
    return f"{n}:{m}|{str(dtype).removeprefix('torch.')}|{out_features}x{in_features}|{'gated' if gated else 'linear'}"


def default_table_path(device: torch.device) -> Path:
    """``$ATV_SPARSE_DISPATCH_TABLE`` if set, else a file per GPU model and torch / triton version
    under ``~/.cache/atv_sparse``."""
    override = os.environ.get("ATV_SPARSE_DISPATCH_TABLE")
    if override:
        return Path(override)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", f"{name}-torch{torch.__version__}-triton{triton_version}")
    return Path.home() / ".cache" / "atv_sparse" / f"dispatch-{stem}.json"


def read_table(path: Path) -> dict:
    """The entries of a table file ({} when it does not exist)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        assert isinstance(entries, dict)
    except (ValueError, KeyError, AssertionError) as exc:
        raise AtvSparseError(f"{path}: not a dispatch table ({exc}); delete it to measure again") from None
    return entries


def write_table(path: Path, entries: dict, device_name: str) -> None:
    """Write atomically (temp file + rename), so a concurrent reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "buckets": list(BUCKETS),
                               "entries": entries}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def plan_from_entry(entry: dict, usable: list[str]) -> Plan | None:
    """The plan a table entry records, or None if it is stale (other buckets, or a backend this
    machine no longer has)."""
    if entry.get("buckets") != list(BUCKETS):
        return None
    backends = tuple(entry["choice"])
    # a hand-edited (or older) table may hold -1 for cuSPARSELt: its default id 0 then
    alg_ids = tuple(max(a, 0) if b == "cusparselt" else a for b, a in zip(backends, entry["alg_ids"]))
    if any(b not in usable and (b not in FACTS or FACTS[b].kernel) for b in backends):
        return None
    return Plan(backends, alg_ids)
