"""SparseGPT (docs/design.md 4.4): prune column by column, compensating with the inverse Hessian.

Follows IST-DASLab/sparsegpt @147d215 operation for operation, so masks equal the reference's
and surviving fp32 weights agree to fp32 rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from ..errors import AtvSparseError
from ..patterns import Pattern
from .rule import PruningRule


class HessianStats:
    """``hessian``: (in, in) fp32 running ``2/n * X^T X`` over sequences; ``nsamples``: sequences seen."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def update(self, x: torch.Tensor) -> None:
        """x: (B, T, in) or (T, in) (counts as B = 1), any float dtype."""
        batch = 1 if x.dim() == 2 else x.shape[0]
        rows = x.reshape(-1, x.shape[-1]).t().to(self.hessian.device)
        self.hessian *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        rows = math.sqrt(2 / self.nsamples) * rows.float()
        self.hessian += rows.matmul(rows.t())


@contextlib.contextmanager
def tf32_disabled():
    """SparseGPT's updates are accurate to fp32 only without TF32 matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one layer.

    weight: (out, in) any float dtype; hessian: (in, in) fp32 from ``HessianStats`` (not modified).
    ``pattern``: unstructured (one mask per block of columns, jointly over rows, at its sparsity)
    or N:M (chosen group by group from the already-updated weights).
    Returns ``(pruned_weight, keep)``: the weight in the input's dtype with pruned entries exactly
    zero and the others updated; keep (out, in) bool.
    """
    n, m, sparsity = pattern.n, pattern.m, pattern.sparsity
    columns = weight.shape[1]
    if m is not None and (columns % m or blocksize % m):
        raise AtvSparseError(f"N:M SparseGPT needs in_features ({columns}) and `blocksize` ({blocksize}) "
                             f"to be multiples of M={m}")
    with tf32_disabled():
        W = weight.detach().clone().float()
        H = hessian.detach().clone().to(W.device)
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(columns, device=W.device)
        H[diag, diag] += damp
        try:
            H = torch.linalg.cholesky(H)
        except torch.linalg.LinAlgError as e:
            raise AtvSparseError(f"the Hessian is not positive definite even after dampening ({e}); "
                                 "raise `percdamp` or calibrate with more tokens") from None
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        del H

        keep = torch.ones_like(W, dtype=torch.bool)
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if m is None:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                pruned1 = tmp <= thresh
            else:
                pruned1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                w = W1[:, i]
                d = Hinv1[i, i]
                if m is not None and i % m == 0:
                    tmp = W1[:, i:i + m] ** 2 / (torch.diag(Hinv1)[i:i + m].reshape((1, -1))) ** 2
                    pruned1.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[pruned1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            keep[:, i1:i2] = ~pruned1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.to(weight.dtype), keep


@dataclasses.dataclass(frozen=True)
class SparseGpt(PruningRule):
    """``sparsegpt_prune`` from ``HessianStats``. blocksize: columns per block (>= 1); percdamp:
    dampening, a fraction of the mean of diag(H) (>= 0)."""

    name = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        if self.blocksize < 1:
            raise AtvSparseError(f"`blocksize` must be at least 1, got {self.blocksize}")
        if not 0 <= self.percdamp:
            raise AtvSparseError(f"`percdamp` must be >= 0, got {self.percdamp}")

    def new_stats(self, in_features, device):
        return HessianStats(in_features, device=device)

    def statistic(self, stats):
        return stats.hessian

    def prune(self, weight, stats, pattern):
        pruned, keep = sparsegpt_prune(weight, stats.hessian, pattern, blocksize=self.blocksize,
                                       percdamp=self.percdamp)
        weight.copy_(pruned)
        return keep

    def stats_bytes(self, linears: list[nn.Linear]) -> int:
        # Every linear's Hessian at once, then one linear's H copy, its inverse factor and fp32 weights.
        return (sum(lin.in_features ** 2 * 4 for lin in linears)
                + max(2 * lin.in_features ** 2 * 4 + 2 * lin.weight.numel() * 4 for lin in linears))

    def settings(self) -> dict:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp}
