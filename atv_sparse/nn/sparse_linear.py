"""``SparseLinear``: a drop-in for ``nn.Linear`` whose weight is stored as bitmask + values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AtvSparseError
from ..formats.bitmask import compress, decompress, expected_values_shape, validate_compressed
from ..ops import triton_ops
from ..ops.dispatch import BACKENDS, TOKEN_LIMITS, Plan, layer_status, machine_status
from ..patterns import Pattern, parse_pattern


class SparseLinear(nn.Module):
    """A linear layer with a pruned weight kept compressed (docs/design.md 6, 7).

    Buffers (their names are the checkpoint keys):
    - ``weight_bitmask``: (out, ceil(in / 8)) uint8, bit k of byte c = column 8c + k, 1 = kept;
    - ``weight_values``: kept weights in row-major order, (out, in * n / m) for N:M, 1-D otherwise.
    ``bias``: optional (out,) parameter, as in ``nn.Linear``.

    ``gated=True`` makes it the fused gate/up projection of a LLaMA / Qwen2 MLP: the weight stacks
    the gate rows over the up rows (out = 2 I) and ``forward`` returns ``silu(x Wg^T) * (x Wu^T)``,
    (..., I).

    ``backend``: ``auto`` (a ``Plan`` per token count, see ``atv_sparse.ops.dispatch``), or one of
    ``cuda``, ``triton``, ``cusparselt``, ``reference`` for every call. ``prepare()`` builds what
    the plan needs on the module's device (cuSPARSELt's buffer, a dense copy where dense cuBLAS
    measured fastest) and is called by ``atv_sparse.load``, or by the first forward otherwise.

    CUDA graphs: ``prepare()`` builds every layout, and the Triton kernels need no table, so a call
    makes no host-to-device copy; but the Triton autotuner compiles and times its configs on the
    first call of each (token bucket, shape): run one forward per token bucket you will capture
    before capturing (as latency.py and llama_decode do), or set ATV_SPARSE_TRITON_ONE_CONFIG=1.
    """

    def __init__(self, in_features: int, out_features: int, pattern: Pattern, bias: bool = False,
                 num_values: int | None = None, device=None, dtype=None, backend: str = "auto",
                 gated: bool = False, name: str = "SparseLinear"):
        super().__init__()
        if backend not in BACKENDS:
            raise AtvSparseError(f"{name}: backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if gated and (out_features % 2 or bias):
            raise AtvSparseError(f"{name}: a gated layer stacks gate and up rows (an even out_features) without bias")
        self.in_features, self.out_features = in_features, out_features
        self.pattern, self.backend, self.gated, self.name = pattern, backend, gated, name
        values_shape = expected_values_shape(out_features, in_features, pattern.n, pattern.m)
        if values_shape is None:
            if num_values is None:
                raise AtvSparseError(f"{name}: an unstructured SparseLinear needs num_values (the kept weights)")
            values_shape = (num_values,)
        self.register_buffer("weight_bitmask", torch.empty(out_features, -(-in_features // 8),
                                                           dtype=torch.uint8, device=device))
        self.register_buffer("weight_values", torch.empty(values_shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        # Kernel layouts built by prepare(); not part of the checkpoint.
        self.register_buffer("cslt_weight", None, persistent=False)
        self.register_buffer("dense_weight_copy", None, persistent=False)
        self.plan: Plan | None = None
        self._plan_for: tuple | None = None

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, linear: nn.Linear, keep: torch.Tensor, pattern: Pattern, **kwargs) -> "SparseLinear":
        """Compress ``linear`` (its weight already pruned) with keep-mask ``keep`` (out, in) bool."""
        bitmask, values = compress(linear.weight.data, keep, pattern.n, pattern.m)
        bias = None if linear.bias is None else linear.bias.data
        return cls.from_packed(bitmask, values, linear.in_features, pattern, bias=bias, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: Pattern | str = "2:4", mask: torch.Tensor | None = None,
                    **kwargs) -> "SparseLinear":
        """Prune ``linear`` to ``pattern`` (``mask`` (out, in) bool = kept; None: by magnitude) and
        compress it. The linear is left untouched: drop it to free its dense weight."""
        from ..prune.masks import pattern_mask

        pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        weight = linear.weight.data
        if pattern.is_nm:
            pattern.check_layer(kwargs.get("name", "linear"), linear.in_features)
        keep = (pattern_mask(weight.abs().float(), None if pattern.is_nm else pattern.sparsity, pattern.n, pattern.m)
                if mask is None else mask.to(weight.device, torch.bool))
        if keep.shape != weight.shape:
            raise AtvSparseError(f"{kwargs.get('name', 'linear')}: mask {tuple(keep.shape)} does not match the "
                                 f"weight {tuple(weight.shape)}")
        return cls.from_dense(linear, keep, pattern, **kwargs)

    @classmethod
    def from_packed(cls, bitmask: torch.Tensor, values: torch.Tensor, in_features: int, pattern: Pattern | str,
                    bias: torch.Tensor | None = None, prepare: bool = False, validate: bool = True,
                    **kwargs) -> "SparseLinear":
        """Wrap an existing bitmask + values pair (shared, not copied); validated first unless
        ``validate=False`` (for pairs already validated, e.g. right after loading)."""
        pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        name = kwargs.get("name", "SparseLinear")
        if validate:
            validate_compressed(name, bitmask, values, bitmask.shape[0], in_features, pattern.n, pattern.m)
        module = cls(in_features, bitmask.shape[0], pattern, bias=bias is not None, num_values=values.numel(),
                     device="meta", dtype=values.dtype, **kwargs)
        module.weight_bitmask, module.weight_values = bitmask, values
        if bias is not None:
            module.bias = nn.Parameter(bias, requires_grad=False)
        if prepare:
            module.prepare()
        return module

    def validate(self, name: str | None = None) -> None:
        """Raise ``AtvSparseError`` naming the layer if the stored tensors are inconsistent."""
        validate_compressed(name or self.name, self.weight_bitmask, self.weight_values, self.out_features,
                            self.in_features, self.pattern.n, self.pattern.m)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense (out, in) tensor with zeros where pruned."""
        return decompress(self.weight_bitmask, self.weight_values, self.in_features)

    # --- backend choice -------------------------------------------------------------------------

    def backend_status(self, backend: str, device: torch.device | None = None) -> str | None:
        """None when ``backend`` can run this layer on ``device`` (default: the layer's), else why not.

        The layer's own reason (dtype, pattern, shape) comes first: it holds on every machine, so a
        float32 layer says "float32" on a GPU machine too, not that its tensors are still on the CPU."""
        device = self.weight_values.device if device is None else device
        return (layer_status(backend, self.pattern.n, self.pattern.m, self.weight_values.dtype, self.out_features,
                             self.in_features) or machine_status(backend, device))

    def usable_backends(self) -> list[str]:
        return [b for b in BACKENDS[1:] if self.backend_status(b) is None]

    def prepare(self, plan: Plan | None = None) -> "SparseLinear":
        """Fix the plan for this device and dtype and build the layouts it uses.

        plan: None = a uniform plan for a fixed backend, or for ``auto`` the reference backend on a
        CPU and ``heuristic_plan`` on a GPU (``atv_sparse.nn.autotune`` passes measured plans).
        """
        from ..ops.dispatch import heuristic_plan

        if self.backend != "auto":
            why = self.backend_status(self.backend)
            if why is not None:
                raise AtvSparseError(f"{self.name}: backend '{self.backend}' cannot run here: {why}; usable "
                                     f"here: {', '.join(self.usable_backends())}")
            plan = Plan.uniform(self.backend) if plan is None else plan
        elif plan is None:
            device = self.weight_values.device
            kernels = [b for b in self.usable_backends() if b != "reference"]
            plan = Plan.uniform("reference") if device.type != "cuda" else heuristic_plan(kernels, False)
        self._build_layouts(plan)
        self.plan = plan
        self._plan_for = (self.weight_values.device, self.weight_values.dtype)
        return self

    def _build_layouts(self, plan: Plan) -> None:
        needs_cslt = "cusparselt" in plan.backends
        needs_dense = "dense" in plan.backends
        self.cslt_weight = self.cslt_weight if needs_cslt else None
        self.dense_weight_copy = self.dense_weight_copy if needs_dense else None
        if (needs_cslt and self.cslt_weight is None) or (needs_dense and self.dense_weight_copy is None):
            dense = self.dense_weight()
            if needs_cslt and self.cslt_weight is None:
                from ..ops.cusparselt import cslt_pack

                self.cslt_weight = cslt_pack(dense)
            if needs_dense:
                self.dense_weight_copy = dense
            del dense  # freed now unless kept as the dense copy

    # --- execution ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.weight_values
        if x.device != weights.device:
            x = x.to(weights.device)  # made correct, not refused: the result lives with the weights
        if x.dtype != weights.dtype:
            raise AtvSparseError(f"{self.name}: input is {x.dtype} but the weights are {weights.dtype}; cast the "
                                 f"input (or load the model with dtype={x.dtype})")
        if self._plan_for != (weights.device, weights.dtype):
            self.prepare()
        tokens = x.numel() // self.in_features
        backend, alg_id = self.plan.pick(tokens)
        limit = TOKEN_LIMITS.get(backend)
        if limit is not None and tokens > limit:
            if self.backend == backend:
                raise AtvSparseError(f"{self.name}: backend '{backend}' runs up to {limit} tokens, got {tokens}; "
                                     f"use backend='auto'")
            backend = "triton"
        return self.run(backend, x, alg_id)

    def run(self, backend: str, x: torch.Tensor, alg_id: int = 0) -> torch.Tensor:
        """One call on a given backend (no checks: ``forward`` dispatches; benchmarks call this)."""
        return run_packed(backend, x, self.weight_bitmask, self.weight_values, self.in_features, self.pattern.n,
                          self.pattern.m, self.bias, self.gated, alg_id, self.cslt_weight, self.dense_weight_copy)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held per layout (the checkpoint pair, cuSPARSELt's buffer, a dense copy, bias)."""
        sizes = {"values": self.weight_values, "bitmask": self.weight_bitmask, "cusparselt": self.cslt_weight,
                 "dense": self.dense_weight_copy, "bias": self.bias}
        return {k: t.numel() * t.element_size() for k, t in sizes.items() if t is not None}

    def extra_repr(self) -> str:
        nbytes = self.resident_bytes()
        dense = self.out_features * self.in_features * self.weight_values.element_size()
        layouts = "+".join(f"{k} {v / 2**20:.2f}MiB" for k, v in nbytes.items())
        plan = self.plan.summary() if self.plan is not None and self.backend == "auto" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"bias={self.bias is not None}{', gated=True' if self.gated else ''}, backend={self.backend}"
                f"{' (' + plan + ')' if plan else ''}, bytes={sum(nbytes.values())} "
                f"({layouts}; dense {dense / 2**20:.2f}MiB)")


def run_packed(backend: str, x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
               n: int | None, m: int | None, bias: torch.Tensor | None = None, gated: bool = False,
               alg_id: int = 0, cslt_weight: torch.Tensor | None = None,
               dense_copy: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` (or the gated ``silu(x Wg^T) * (x Wu^T)``) on one backend, no checks.

    Shared by ``SparseLinear.run`` and the stateless ``atv_sparse.ops.sparse_linear``; only the
    ``cusparselt`` and ``dense`` backends need a prepared layout (``cslt_weight``, ``dense_copy``).
    """
    if backend == "triton":
        if gated:
            return triton_ops.nm_gated(x, values, bitmask, n, m)
        return triton_ops.nm_linear(x, values, bitmask, n, m, bias)
    if backend == "cuda":
        from ..ops import cuda_lib

        if gated:
            half = values.shape[0] // 2
            return cuda_lib.nm_gated_cuda(x, values[:half], bitmask[:half], values[half:], bitmask[half:], n, m)
        return cuda_lib.nm_linear_cuda(x, values, bitmask, n, m, bias)
    if backend == "cusparselt":
        from ..ops.cusparselt import cslt_linear

        y = cslt_linear(x, cslt_weight, bitmask.shape[0], alg_id, bias)
    elif backend == "dense":
        y = F.linear(x, dense_copy, bias)
    else:
        y = F.linear(x, decompress(bitmask, values, in_features), bias)
    if gated:
        half = bitmask.shape[0] // 2
        return F.silu(y[..., :half]) * y[..., half:]
    return y
