"""The Mixture-of-Transformers probe (docs/design.md 4.7, ATV paper section 3.2).

Does pruning for visual tokens need different weights than pruning for text? The probe gives every
decoder block two copies of its linears, a textual and a visual pathway, and routes each position
to one of them by the image-token mask; norms, RoPE and attention stay shared:

    attach_mot(model):
        for each decoder block, for l in q, k, v, o (unless shared_o), gate, up, down:
            l  ->  MoTLinear(text = l (the original module), visual = a copy of l)
        MoTLinear(x) = torch.where(visual_mask[..., None], visual(x), text(x))
                       (both pathways run on the whole sequence; the mask picks rows)

Unpruned, both pathways hold the same weights and run the same kernel on the same input, so the
probe's logits are bit-identical (``torch.equal``) to the original model's.

The routing mask. Before every forward of the model a pre-hook computes it from that call's inputs:
a position is visual when its input id is the image token id *and* the call carries image inputs
(``pixel_values``, or ``mm_encoder_outputs`` holding image features), i.e. exactly the positions
the model fills with image features. A call without image inputs routes every position to text:
that covers ``generate()``'s decoding steps, which continue a KV cache with newly generated text
tokens (generate drops the image inputs after the prefill), even when a generated id happens to
be the image token id. A forward hook clears the mask afterwards, so a linear that runs with no
mask (a block called directly, or a forward given ``inputs_embeds``) fails loudly instead of
routing stale rows; calibration code sets the mask itself with ``probe.routing(mask)``.

Pruning (``mot_prune``): Wanda (4.3), block by block with propagation through the probe, on the
block walk every pruning pass uses (prune/walk.py):

    capture block-0 inputs (model forward, routed)
    for each block b:
        statistics pass: run b (still dense) on each sample, routed; hooks on the chosen pathway's
                         linears accumulate Wanda's r over the rows of the chosen calibration
                         modality (text, visual or all non-padding rows), one sample = one sequence
        prune:           keep = mask(|W| * sqrt(r)) on that pathway only (unstructured or N:M)
        propagate:       run the pruned b, routed -> inputs of b + 1

The other pathway is never written, so it stays bit-identical to the original weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AtvSparseError
from ..formats.bitmask import pack_bitmask
from ..models.adapter import config_image_token_id
from ..patterns import Pattern, parse_pattern
from ..prune.masks import keep_mask
from ..prune.walk import check_finite, walk_blocks
from ..prune.wanda import WandaStats, wanda_score

PATHWAYS = ("text", "visual")
CALIB_ROWS = ("text", "visual", "all")
# Linears of a Llama / Qwen2 decoder block that get two pathways, relative to the block.
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED_O = "self_attn.o_proj"


def call_has_images(inputs: dict) -> bool:
    """Whether a model call's keyword inputs carry image features (raw pixels or pre-encoded)."""
    if inputs.get("pixel_values") is not None:
        return True
    encoded = inputs.get("mm_encoder_outputs")
    return isinstance(encoded, dict) and encoded.get("image") is not None


def visual_positions(input_ids: torch.Tensor, image_token_id: int, has_images: bool) -> torch.Tensor:
    """The routing mask of one model call: (B, T) bool, True where the model places image features.

    input_ids: (B, T) int64. With ``has_images`` False (e.g. a decoding step) every position is text.
    """
    if not has_images:
        return torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return input_ids == image_token_id


_NO_MASK = "no model forward is running and no mask was set with probe.routing(mask)"


class _Router:
    """The routing mask shared by the MoTLinears of one probe: (B, T) bool, or None outside a forward
    (``missing`` then says why)."""

    def __init__(self):
        self.current: torch.Tensor | None = None
        self.missing = _NO_MASK
        self.saved: list[tuple] = []  # (current, missing) of the enclosing scope, one per running model forward

    def mask_for(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The mask for input x: (B, T, in) of linear ``name``, on x's device."""
        if self.current is None:
            raise AtvSparseError(f"MoT probe: linear {name} ran without an image-token mask ({self.missing}); "
                                 "call the model with input_ids, or wrap direct block calls in probe.routing(mask)")
        if tuple(self.current.shape) != tuple(x.shape[:-1]):
            raise AtvSparseError(f"MoT probe: linear {name} got input {tuple(x.shape)} but the image-token mask is "
                                 f"{tuple(self.current.shape)}; the mask must be (batch, tokens) of this call")
        return self.current.to(x.device)


class MoTLinear(nn.Module):
    """Two pathways of one linear, routed by position.

    ``text``: the original ``nn.Linear`` (same object); ``visual``: a deep copy of it.
    forward(x: (B, T, in)) -> (B, T, out): row (b, t) from ``visual(x)`` where the probe's mask is
    True, else from ``text(x)``; both pathways run on every row.
    """

    def __init__(self, linear: nn.Linear, router: _Router, name: str):
        super().__init__()
        self.text = linear
        self.visual = copy.deepcopy(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._router, self._name = router, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visual = self._router.mask_for(x, self._name)
        return torch.where(visual.unsqueeze(-1), self.visual(x), self.text(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pathways=(text, visual)"


class MoTProbe:
    """A model with MoT pathways attached (see ``attach_mot``).

    model: the model, modified in place; layers / layers_prefix: its decoder blocks and their
    module name; linears: full name of each replaced linear -> its ``MoTLinear``; shared: full
    names of the linears left with one pathway (o_proj with ``shared_o``).
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, layers_prefix: str, image_token_id: int,
                 shared_o: bool):
        self.model, self.layers, self.layers_prefix = model, layers, layers_prefix
        self.image_token_id, self.shared_o = image_token_id, shared_o
        self.router = _Router()
        self.linears: dict[str, MoTLinear] = {}
        self.shared: list[str] = []
        self._handles: list = []

    def visual_mask(self, inputs: dict) -> torch.Tensor:
        """The routing mask for ``model(**inputs)``: (B, T) bool (see the module docstring)."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise AtvSparseError("MoT probe: the model was called without input_ids (inputs_embeds?); the probe "
                                 "routes positions by input_ids == image_token_id, so pass input_ids")
        return visual_positions(input_ids, self.image_token_id, call_has_images(inputs))

    @contextlib.contextmanager
    def routing(self, mask: torch.Tensor):
        """Route with ``mask`` (B, T) bool (True = visual pathway) inside the block."""
        saved = self.router.current
        self.router.current = mask
        try:
            yield
        finally:
            self.router.current = saved

    def pathway(self, name: str, block: int | None = None) -> dict[str, nn.Linear]:
        """Full module name -> linear of pathway ``name`` ("text" / "visual"), optionally of one block."""
        if name not in PATHWAYS:
            raise AtvSparseError(f"MoT pathway {name!r}: choose one of {', '.join(PATHWAYS)}")
        prefix = f"{self.layers_prefix}.{block}." if block is not None else ""
        return {f"{full}.{name}": getattr(mot, name) for full, mot in self.linears.items() if full.startswith(prefix)}

    def _before_forward(self, module, args, kwargs):
        router = self.router
        router.saved.append((router.current, router.missing))
        inputs = dict(kwargs)
        if args:  # model(input_ids, ...) positionally
            inputs.setdefault("input_ids", args[0])
        if inputs.get("input_ids") is None:
            router.current = None
            router.missing = "the model was called without input_ids (inputs_embeds?); pass input_ids"
        else:
            router.current = self.visual_mask(inputs)

    def _after_forward(self, module, args, kwargs, output):
        # Runs even when the forward raised (always_call), so no mask outlives its call.
        router = self.router
        router.current, router.missing = router.saved.pop() if router.saved else (None, _NO_MASK)

    def detach(self, keep: str = "text") -> None:
        """Put plain linears back (pathway ``keep``'s modules; "text" = the original objects) and remove the hooks."""
        if keep not in PATHWAYS:
            raise AtvSparseError(f"MoT detach(keep={keep!r}): choose one of {', '.join(PATHWAYS)}")
        for full, mot in self.linears.items():
            parent_name, _, attr = full.rpartition(".")
            setattr(self.model.get_submodule(parent_name), attr, getattr(mot, keep))
        for handle in self._handles:
            handle.remove()
        self.linears, self._handles = {}, []


def attach_mot(model: nn.Module, image_token_id: int | None = None, shared_o: bool = False) -> MoTProbe:
    """Give every decoder block of ``model`` a textual and a visual pathway, in place; returns the probe.

    model: a vision-language model with Llama / Qwen2 decoder blocks (LLaVA-1.5 / NeXT / OneVision,
    Qwen2-VL, Qwen2.5-VL); image_token_id: default ``model.config.image_token_id`` (or
    ``image_token_index``); shared_o: keep one o_proj (the literal reading of "QKV and FFN").
    The visual pathway is a copy of each linear: the language model's linear weights take twice
    their memory while the probe is attached.
    """
    if image_token_id is None:
        image_token_id = config_image_token_id(model.config)
        if image_token_id is None:
            raise AtvSparseError(f"{type(model).__name__}: the config has no image_token_id, so the MoT probe cannot "
                                 "tell visual positions from text; give a vision-language model or image_token_id=")
    if any(isinstance(m, MoTLinear) for m in model.modules()):
        raise AtvSparseError("the model already has a MoT probe attached; call probe.detach() first")
    layers = model.get_decoder().layers
    prefix = next(name for name, module in model.named_modules() if module is layers)
    probe = MoTProbe(model, layers, prefix, int(image_token_id), shared_o)
    names = ATTENTION_LINEARS + MLP_LINEARS
    for b, block in enumerate(layers):
        for rel in names:
            full = f"{prefix}.{b}.{rel}"
            try:
                linear = block.get_submodule(rel)
            except AttributeError:
                linear = None
            if type(linear) is not nn.Linear:
                raise AtvSparseError(f"{full}: expected a dense nn.Linear (a Llama / Qwen2 decoder block), found "
                                     f"{type(linear).__name__}; attach the MoT probe to a dense model")
    for b, block in enumerate(layers):
        for rel in names:
            full = f"{prefix}.{b}.{rel}"
            if shared_o and rel == SHARED_O:
                probe.shared.append(full)
                continue
            parent_name, _, attr = rel.rpartition(".")
            mot = MoTLinear(block.get_submodule(rel), probe.router, full)
            setattr(block.get_submodule(parent_name), attr, mot)
            probe.linears[full] = mot
    # The inner model too: scorers call it directly (``model.model(**batch)``, no full-vocabulary
    # logits); nested calls push and pop the same mask.
    inner = getattr(model, "model", None)
    for module in [model] + ([inner] if isinstance(inner, nn.Module) else []):
        probe._handles += [module.register_forward_pre_hook(probe._before_forward, with_kwargs=True),
                           module.register_forward_hook(probe._after_forward, with_kwargs=True, always_call=True)]
    return probe


@dataclasses.dataclass
class MoTReport:
    """What ``mot_prune`` did.

    bitmasks: full name of each pruned pathway linear (``...q_proj.visual``) -> packed keep-mask
    (out, ceil(in / 8)) uint8 on the CPU (``formats.bitmask.unpack_bitmask`` reads it); sparsity:
    the same names -> achieved fraction of zeros in the mask; blocks: per block, the rows that fed
    the statistics (``text_rows`` / ``visual_rows``) and seconds per pass; shared: linears with one
    pathway, left dense.
    """

    pathway: str
    calib: str
    pattern: str
    bitmasks: dict[str, torch.Tensor]
    sparsity: dict[str, float]
    blocks: list[dict]
    shared: list[str]


def _calibration_rows(probe: MoTProbe, samples: list[dict], calib: str) -> tuple[list, list]:
    """Per sample: the routing mask (1, T) and the rows feeding the statistics (1, T), both bool."""
    routes, rows = [], []
    for j, sample in enumerate(samples):
        ids = sample.get("input_ids") if isinstance(sample, dict) else None
        if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] != 1:
            shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
            raise AtvSparseError(f"MoT calibration sample {j}: expected model inputs with input_ids of shape (1, T), "
                                 f"got {shape}; give one sequence per sample")
        visual = probe.visual_mask(sample).cpu()
        mask = sample.get("attention_mask")
        real = torch.ones_like(visual) if mask is None else mask.bool().cpu()
        routes.append(visual)
        rows.append({"text": real & ~visual, "visual": real & visual, "all": real}[calib])
    return routes, rows


@torch.no_grad()
def mot_prune(probe: MoTProbe, samples: list[dict], pathway: str = "visual", calib: str = "all",
              pattern: str | Pattern = "unstructured", sparsity: float | None = None,
              device: torch.device | str | None = None, progress: bool = False) -> MoTReport:
    """Prune one pathway of the probe with Wanda, block by block, in place (see the module docstring).

    samples: model inputs per calibration sample (``input_ids`` (1, T) and the image inputs, as
    ``calib.multimodal.build_sample`` makes them); pathway: "visual" or "text"; calib: the rows
    whose statistics score it, "text", "visual" or "all" (every non-padding row); pattern:
    "unstructured" with ``sparsity`` (default 0.5), "2:4", "4:8", any N:M, or a ``Pattern``.
    The model stays on the CPU; each block visits ``device`` (default: cuda if available) in turn.
    """
    if pathway not in PATHWAYS:
        raise AtvSparseError(f"MoT pathway {pathway!r}: choose one of {', '.join(PATHWAYS)}")
    if calib not in CALIB_ROWS:
        raise AtvSparseError(f"MoT calibration rows {calib!r}: choose one of {', '.join(CALIB_ROWS)}")
    if not probe.linears:
        raise AtvSparseError("the MoT probe was detached; attach_mot(model) again")
    if not isinstance(pattern, Pattern):
        pattern = parse_pattern(pattern, sparsity)
    if not samples:
        raise AtvSparseError("mot_prune needs at least one calibration sample")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    targets = probe.pathway(pathway)
    for name, linear in targets.items():
        pattern.check_layer(name, linear.in_features)
    routes, rows = _calibration_rows(probe, samples, calib)
    if not any(r.any() for r in rows):
        raise AtvSparseError(f"MoT calibration rows {calib!r}: none of the {len(samples)} samples has such a position "
                             "(visual rows need samples with images)")
    report = MoTReport(pathway, calib, str(pattern), {}, {}, [], list(probe.shared))

    walk = walk_blocks(probe.model, probe.layers, samples, device, progress=progress,
                       sample_context=lambda j: probe.routing(routes[j].to(device)))
    for step in walk:
        b, run = step.index, step.run
        block_targets = probe.pathway(pathway, b)
        t0 = time.perf_counter()
        stats = _statistics(run, block_targets, rows, device, f"{step.label}: Calibrating", progress)
        info = {"block": b, "text_rows": sum(int((r & ~v).sum()) for r, v in zip(rows, routes, strict=True)),
                "visual_rows": sum(int((r & v).sum()) for r, v in zip(rows, routes, strict=True)),
                "time_calibrate_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        for name, linear in block_targets.items():
            check_finite(name, stats[name].scaler_row)
            keep = keep_mask(wanda_score(linear.weight.data, stats[name]), pattern)
            linear.weight.data.masked_fill_(~keep, 0)
            report.bitmasks[name] = pack_bitmask(keep).cpu()
            report.sparsity[name] = 1 - keep.sum().item() / keep.numel()
        info["time_prune_s"] = time.perf_counter() - t0
        if b + 1 < step.count:
            t0 = time.perf_counter()
            step.propagate()
            info["time_propagate_s"] = time.perf_counter() - t0
        report.blocks.append(info)
    return report


def _statistics(run, block_targets, rows, device, desc, progress) -> dict[str, WandaStats]:
    """Wanda statistics of ``block_targets`` over each sample's chosen rows, the block still dense."""
    stats = {name: WandaStats(linear.in_features, device=device) for name, linear in block_targets.items()}
    current = {}

    def hook(module, args, output, name):
        stats[name].update(args[0][current["rows"]])  # (rows, in): one sample counts as one sequence

    handles = [linear.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
               for name, linear in block_targets.items()]
    try:
        for j in tqdm(range(len(rows)), desc=desc, disable=not progress, leave=False):
            current["rows"] = rows[j].to(device)
            run(j)  # routed by the runner's sample context
    finally:
        for h in handles:
            h.remove()
    return stats
