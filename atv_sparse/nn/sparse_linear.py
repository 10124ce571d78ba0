"""``SparseLinear``: a drop-in for ``nn.Linear`` whose weight is stored as bitmask + values."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AtvSparseError
from ..formats.bitmask import bitmask_shape, compress, decompress, validate_compressed, values_shape
from ..ops.autotune import LayerShape
from ..ops.dispatch import BACKENDS, Plan, layer_status, machine_status
from ..ops.runner import build_layouts, default_plan, pick_backend, place_weights, run_backend
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
    ``cuda``, ``triton``, ``cusparselt``, ``cpu``, ``reference`` for every call. ``prepare()`` builds
    what the plan needs on the module's device (cuSPARSELt's buffer, a dense copy where dense cuBLAS
    measured fastest; for ``cpu`` the pair moved to huge pages, no second copy) and is called by
    ``atv_sparse.load``, or by the first forward otherwise.

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
        shape = values_shape(out_features, in_features, pattern.n, pattern.m)
        if shape is None:
            if num_values is None:
                raise AtvSparseError(f"{name}: an unstructured SparseLinear needs num_values (the kept weights)")
            shape = (num_values,)
        self.register_buffer("weight_bitmask", torch.empty(bitmask_shape(out_features, in_features),
                                                           dtype=torch.uint8, device=device))
        self.register_buffer("weight_values", torch.empty(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        # Kernel layouts built by prepare(); not part of the checkpoint.
        self.register_buffer("cslt_weight", None, persistent=False)
        self.register_buffer("dense_weight_copy", None, persistent=False)
        self.register_buffer("sp24_layout", None, persistent=False)
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
        from ..prune.masks import keep_mask

        pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        weight = linear.weight.data
        if pattern.is_nm:
            pattern.check_layer(kwargs.get("name", "linear"), linear.in_features)
        keep = keep_mask(weight.abs().float(), pattern) if mask is None else mask.to(weight.device, torch.bool)
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

    def layer_shape(self) -> LayerShape:
        """What this layer's plan depends on (the key of the measured table)."""
        return LayerShape(self.pattern.n, self.pattern.m, self.weight_values.dtype, self.out_features,
                          self.in_features, self.gated, self.bias is not None)

    def prepare(self, plan: Plan | None = None) -> "SparseLinear":
        """Fix the plan for this device and dtype and build the layouts it uses.

        plan: None = a uniform plan for a fixed backend, or for ``auto`` ``ops.runner.default_plan``
        (``heuristic_plan`` over the kernels usable here: ``cpu`` on a CPU where it built, else
        the reference backend); ``prepare_model`` passes measured plans.
        """
        if self.backend != "auto":
            why = self.backend_status(self.backend)
            if why is not None:
                raise AtvSparseError(f"{self.name}: backend '{self.backend}' cannot run here: {why}; usable "
                                     f"here: {', '.join(self.usable_backends())}")
            plan = Plan.uniform(self.backend) if plan is None else plan
        elif plan is None:
            kernels = [b for b in self.usable_backends() if b != "reference"]
            plan = default_plan(self.weight_values.device, kernels)
        self.weight_bitmask, self.weight_values = place_weights(plan, self.weight_bitmask, self.weight_values)
        self.cslt_weight, self.dense_weight_copy, self.sp24_layout = build_layouts(
            plan, self.weight_bitmask, self.weight_values, self.in_features, self.cslt_weight,
            self.dense_weight_copy, self.sp24_layout)
        self.plan = plan
        self._plan_for = (self.weight_values.device, self.weight_values.dtype)
        return self

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
        backend, alg_id = pick_backend(self.plan, x.numel() // self.in_features, self.backend, self.name)
        return self.run(backend, x, alg_id)

    def run(self, backend: str, x: torch.Tensor, alg_id: int = 0) -> torch.Tensor:
        """One call on a given backend (no checks: ``forward`` dispatches; benchmarks call this)."""
        return run_backend(backend, x, self.weight_bitmask, self.weight_values, self.in_features, self.pattern.n,
                           self.pattern.m, self.bias, self.gated, alg_id, self.cslt_weight, self.dense_weight_copy,
                           self.sp24_layout)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held per layout (the checkpoint pair, cuSPARSELt's buffer, a dense copy, the sparse
        tensor-core fragments, bias)."""
        sizes = {"values": self.weight_values, "bitmask": self.weight_bitmask, "cusparselt": self.cslt_weight,
                 "dense": self.dense_weight_copy, "sp24": self.sp24_layout, "bias": self.bias}
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

