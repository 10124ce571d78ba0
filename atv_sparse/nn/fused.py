"""Fused modules for LLaMA / Qwen2 decoder blocks: one sparse kernel for q/k/v, one for gate/up.

- MLP: ``gate_proj`` and ``up_proj`` become one gated ``SparseLinear`` (rows stacked, forward =
  ``silu(x Wg^T) * (x Wu^T)``), wrapped with ``down_proj`` in ``SparseMLP``, which replaces the
  block's ``mlp``.
- Attention: q/k/v become one ``SparseLinear`` (rows stacked, biases concatenated). The attention
  code of ``transformers`` calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` in turn, so
  ``q_proj`` becomes ``FusedQKV`` (one kernel for all three; it returns q and keeps k and v) and
  ``k_proj`` / ``v_proj`` become ``QKVSlice`` views that hand those back. A slice called with any
  other input (or out of order) recomputes from the fused weight: slower, never wrong.

Groups are fused only when every member is a ``SparseLinear`` with the same pattern, dtype and
in_features; a partly pruned group stays as it is. Each fused pair / triple replaces its parts
as soon as it exists, so fusing a model never holds more than one extra group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sparse_linear import SparseLinear


def stack_rows(parts: list[SparseLinear], gated: bool = False, name: str = "fused") -> SparseLinear:
    """One ``SparseLinear`` whose rows are the parts' rows in order (N:M parts only)."""
    first = parts[0]
    biases = [p.bias for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.data if b is not None else torch.zeros(p.out_features, dtype=first.weight_values.dtype,
                                                                      device=first.weight_values.device)
                          for b, p in zip(biases, parts, strict=True)])
    return SparseLinear.from_packed(torch.cat([p.weight_bitmask for p in parts]),
                                    torch.cat([p.weight_values for p in parts]), first.in_features, first.pattern,
                                    bias=bias, backend=first.backend, gated=gated, name=name, validate=False)


def _fusable(parts) -> bool:
    if not all(isinstance(p, SparseLinear) for p in parts):
        return False
    first = parts[0]
    return first.pattern.is_nm and all(
        p.pattern == first.pattern and p.in_features == first.in_features and not p.gated
        and p.weight_values.dtype == first.weight_values.dtype and p.weight_values.device == first.weight_values.device
        for p in parts)


class SparseMLP(nn.Module):
    """``down(silu(x Wg^T) * (x Wu^T))`` with the gate/up pair as one gated ``SparseLinear``."""

    def __init__(self, gate_up: SparseLinear, down_proj: nn.Module):
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x))


class FusedQKV(nn.Module):
    """Installed as ``q_proj``: runs the stacked q/k/v weight once, returns q, keeps k and v for
    the ``QKVSlice`` modules installed as ``k_proj`` / ``v_proj``."""

    def __init__(self, qkv: SparseLinear, sizes: tuple[int, int, int]):
        super().__init__()
        self.qkv = qkv
        self.sizes = sizes
        self.last_input: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qkv(x)
        self.last_input, self.last_output = x, y
        return y[..., : self.sizes[0]]

    def part(self, x: torch.Tensor, start: int, stop: int, last: bool) -> torch.Tensor:
        y = self.last_output if self.last_input is x else None
        if y is None:
            y = self.qkv(x)
        if last:  # drop the references so activations are not kept alive between layers
            self.last_input = self.last_output = None
        return y[..., start:stop]


class QKVSlice(nn.Module):
    """Installed as ``k_proj`` / ``v_proj``: columns [start, stop) of the fused output."""

    def __init__(self, owner: FusedQKV, start: int, stop: int, last: bool):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered twice in the module tree
        self.start, self.stop, self.last = start, stop, last
        self.in_features, self.out_features = owner.qkv.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner[0].part(x, self.start, self.stop, self.last)

    def extra_repr(self) -> str:
        return f"fused columns [{self.start}, {self.stop})"


def _is_silu(act) -> bool:
    if isinstance(act, nn.SiLU):
        return True
    probe = torch.linspace(-4, 4, 9)
    try:
        return torch.equal(act(probe), F.silu(probe))
    except Exception:
        return False


def fuse_decoder_blocks(model: nn.Module) -> list[str]:
    """Fuse q/k/v and gate/up of every LLaMA / Qwen2-style block whose parts are all sparse.

    Returns the names of the fused modules (``...self_attn.qkv``, ``...mlp.gate_up``).
    """
    fused = []
    for name, module in list(model.named_modules()):
        parts = [getattr(module, p, None) for p in ("q_proj", "k_proj", "v_proj")]
        if not isinstance(module, FusedQKV) and _fusable(parts):
            qkv = stack_rows(parts, name=f"{name}.qkv")
            sizes = tuple(p.out_features for p in parts)
            owner = FusedQKV(qkv, sizes)
            module.q_proj = owner
            module.k_proj = QKVSlice(owner, sizes[0], sizes[0] + sizes[1], last=False)
            module.v_proj = QKVSlice(owner, sizes[0] + sizes[1], sum(sizes), last=True)
            fused.append(f"{name}.qkv")
        mlp = getattr(module, "mlp", None)
        if mlp is not None and not isinstance(mlp, SparseMLP):
            gate_up = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]
            if _fusable(gate_up) and gate_up[0].bias is None and gate_up[1].bias is None \
                    and _is_silu(getattr(mlp, "act_fn", None)) and hasattr(mlp, "down_proj"):
                module.mlp = SparseMLP(stack_rows(gate_up, gated=True, name=f"{name}.mlp.gate_up"), mlp.down_proj)
                fused.append(f"{name}.mlp.gate_up")
    return fused
