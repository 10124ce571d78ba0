"""The sequential block driver: prune a model block by block with propagated calibration inputs.

    capture block-0 inputs (real embeddings, real keyword arguments) for every sample
    for each decoder block b:
        selector.begin_block(b)       which positions feed b's statistics (all, here)
        Calibrating   run b densely with hooks on its target linears -> statistics
        Pruning       statistics -> masks -> weights zeroed (SparseGPT: updated) in place
        Propagating   run the pruned b -> inputs of block b + 1

Blocks visit the compute device one at a time; calibration activations stay on the CPU unless
they fit comfortably on the device. The driver always runs the model's own modules: it never
re-implements a decoder layer.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AtvSparseError
from ..formats.bitmask import pack_bitmask
from ..patterns import Pattern
from .magnitude import magnitude_mask
from .masks import pattern_mask
from .selectors import MixedTokens
from .sparsegpt import HessianStats, sparsegpt_prune
from .tamp import TampStats
from .wanda import WandaStats, wanda_score

# Score / update rules: Wanda's statistics over sequences, TAMP's over selected tokens (then the
# Wanda score), SparseGPT's Hessian, or no calibration at all.
METHODS = ("magnitude", "wanda", "sparsegpt", "tamp")
CALIBRATED_METHODS = ("wanda", "sparsegpt", "tamp")


class TokenSelector(Protocol):
    """The hook point "which token positions feed the statistics of this block" (see selectors.py).

    ``begin_block`` is called once per block before its statistics pass with a ``BlockRunner``
    (``runner.pair(j) -> (x_in, x_out)`` runs the still-dense block on sample j's current
    inputs); it returns a dict merged into the block's report. ``positions(j)`` gives the
    positions (1-D int64) of sample j that feed the statistics, or ``None`` for all of them.
    A selector that chooses per linear (TAMP) also has ``linear_positions(j, name, output)``,
    called from the hook of linear ``name`` with its output; the driver then uses that instead.
    """

    name: str

    def begin_block(self, block_index: int, runner: "BlockRunner", num_samples: int) -> dict: ...

    def positions(self, sample_index: int) -> torch.Tensor | None: ...


@dataclasses.dataclass
class PruneResult:
    """bitmasks: module name -> packed keep-mask (out, ceil(in / 8)) uint8 on the CPU;
    blocks: one report dict per block; timings: seconds per phase."""

    bitmasks: dict[str, torch.Tensor]
    blocks: list[dict]
    timings: dict[str, float]


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for block 0: records its inputs and stops the forward."""

    def __init__(self, block: nn.Module, sink: list):
        super().__init__()
        self.block = block
        self.sink = sink

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((hidden, {k: v for k, v in kwargs.items()}))
        raise _StopForward

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)  # e.g. attention_type read by the decoder loop


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b or (not torch.is_tensor(a) and not torch.is_tensor(b) and a == b)


def _dedup_kwargs(kwargs: dict, previous: dict | None) -> dict:
    """Reuse the previous sample's kwarg objects where equal (text windows share all of them)."""
    if previous is None:
        return kwargs
    return {k: previous[k] if k in previous and _same(v, previous[k]) else v for k, v in kwargs.items()}


def storage_device(device: torch.device, nbytes: int) -> torch.device:
    """Where cached activations live: on the compute device only when they take < 25% of its free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < 0.25 * free:
            return device
    return torch.device("cpu")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, samples: list[dict],
                         device: torch.device, progress: bool = True) -> tuple[list, list, torch.device]:
    """Run the model up to block 0 for each sample; return (hidden states, kwargs, storage device).

    samples: model inputs per sample (``input_ids`` (1, T) and, for a vision-language model, its
    image inputs), passed to ``model(**sample)``, so vision towers and projectors run densely
    and 3-D M-RoPE positions come out exactly as the model computes them.

    Everything but the blocks visits ``device`` for the capture; block 0 is swapped for a catcher
    that records ``hidden_states`` and the keyword arguments the model passes its layers.
    """
    catcher_sink: list = []
    first = layers[0]
    layers[0] = _InputCatcher(first, catcher_sink)
    kept_aside = [layers[i] for i in range(1, len(layers))]
    for i in range(1, len(layers)):
        layers[i] = nn.Identity()  # so model.to(device) moves no other block
    hidden, kwargs, previous = [], [], None
    store = None
    try:
        model.to(device)
        for sample in tqdm(samples, desc="Capturing block-0 inputs", disable=not progress, leave=False):
            try:
                model(**_to(sample, device), use_cache=False)
            except _StopForward:
                pass
            h, kw = catcher_sink.pop()
            if store is None:
                store = storage_device(device, h.numel() * h.element_size() * len(samples) * 2)
            kw = _dedup_kwargs(_to(kw, store), previous)
            hidden.append(h.to(store))
            kwargs.append(kw)
            previous = kw
    finally:
        model.to("cpu")
        layers[0] = first
        for i, block in enumerate(kept_aside, 1):
            layers[i] = block
    return hidden, kwargs, store


def _block_output(out):
    """A decoder layer returns a tensor (transformers 5) or a tuple starting with it (older)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def prune_blocks(model: nn.Module, layers: nn.ModuleList, layers_prefix: str, targets: dict[str, nn.Linear],
                 method: str, pattern: Pattern, samples: list[dict] | None, device: torch.device,
                 selector: TokenSelector | None = None, blocksize: int = 128, percdamp: float = 0.01,
                 sparsities: dict[str, float] | None = None, progress: bool = True) -> PruneResult:
    """Prune ``targets`` (full module names -> linears) in place, block by block.

    method: "magnitude" (no samples needed), "wanda", "sparsegpt" or "tamp" (``samples``: model
    inputs per sample, at least ``input_ids`` (1, T) int64). ``selector`` picks the positions
    feeding each block's statistics (default: all). ``sparsities`` overrides an unstructured
    pattern's sparsity per module (TAMP's DAS). The model stays on the CPU; each block visits
    ``device`` in turn.

    Targets outside the decoder blocks (named explicitly by the user) are pruned where they run:
    linears that run before block 0 (vision tower, projector) from statistics over all their
    input rows gathered while block-0 inputs are captured, which are then captured again through
    the pruned linears; ``lm_head`` last, from the final norm of the last block's outputs.
    """
    if method not in METHODS:
        raise AtvSparseError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    selector = selector or MixedTokens()
    timings = {"capture": 0.0, "calibrate": 0.0, "prune": 0.0, "propagate": 0.0}
    result = PruneResult({}, [], timings)
    calibrated = method in CALIBRATED_METHODS
    in_blocks = {n: m for n, m in targets.items() if n.startswith(layers_prefix + ".")}
    outside = {n: m for n, m in targets.items() if n not in in_blocks}
    after_blocks = {}

    def prune_into_result(name, mod, stats):
        layer_pattern = Pattern(None, None, sparsities[name]) if sparsities and name in sparsities else pattern
        result.bitmasks[name] = pack_bitmask(_prune_linear(mod, method, layer_pattern, stats, blocksize,
                                                           percdamp)).cpu()

    if not calibrated:
        for name, mod in outside.items():
            prune_into_result(name, mod, None)
    else:
        if not samples:
            raise AtvSparseError(f"method {method} needs calibration samples (--nsamples >= 1)")
        t0 = time.perf_counter()
        before = {}
        if outside:
            before = _stats_while(model, outside, method, device,
                                  lambda: capture_block_inputs(model, layers, samples, device, progress))
            for name, st in before.items():
                prune_into_result(name, outside[name], st)
            after_blocks = {n: m for n, m in outside.items() if n not in before}
        hidden, kwargs, store = capture_block_inputs(model, layers, samples, device, progress)
        timings["capture"] = time.perf_counter() - t0

    num_blocks = len(layers)
    for b, block in enumerate(layers):
        prefix = f"{layers_prefix}.{b}."
        block_targets = {name: mod for name, mod in in_blocks.items() if name.startswith(prefix)}
        report = {"block": b, "modules": len(block_targets)}
        label = f"({b + 1}/{num_blocks})"
        block.to(device)
        run = BlockRunner(block, hidden, kwargs, device) if calibrated else None

        stats = {}
        if calibrated and block_targets:
            t0 = time.perf_counter()
            report.update(selector.begin_block(b, run, len(samples)))
            stats, counts = _collect_stats(run, block_targets, method, selector, len(samples), device,
                                           f"{label}: Calibrating", progress)
            report.update(counts)
            report["time_calibrate_s"] = time.perf_counter() - t0
            timings["calibrate"] += report["time_calibrate_s"]

        t0 = time.perf_counter()
        for name, mod in tqdm(block_targets.items(), desc=f"{label}: Pruning", disable=not progress, leave=False):
            prune_into_result(name, mod, stats.pop(name, None))
        report["time_prune_s"] = time.perf_counter() - t0
        timings["prune"] += report["time_prune_s"]

        if calibrated and (b + 1 < num_blocks or after_blocks):
            t0 = time.perf_counter()
            for j in tqdm(range(len(samples)), desc=f"{label}: Propagating", disable=not progress, leave=False):
                hidden[j] = run(j).to(store)
            report["time_propagate_s"] = time.perf_counter() - t0
            timings["propagate"] += report["time_propagate_s"]
        block.to("cpu")
        result.blocks.append(report)
    if after_blocks:
        t0 = time.perf_counter()
        _prune_output_head(model, after_blocks, hidden, method, device, prune_into_result)
        timings["prune"] += time.perf_counter() - t0
    return result


_STATS = {"wanda": WandaStats, "tamp": TampStats, "sparsegpt": HessianStats}


def _check_finite(name: str, st) -> None:
    values = st.hessian if isinstance(st, HessianStats) else st.scaler_row
    if not torch.isfinite(values).all():
        raise AtvSparseError(f"layer {name}: NaN or Inf in the calibration statistics; the model "
                             "overflows on this data (try --dtype float32 or bfloat16)")


def _stats_while(model, linears: dict[str, nn.Linear], method: str, device, work) -> dict:
    """Statistics of every input row of ``linears`` while ``work()`` runs; only those that ran."""
    stats = {name: _STATS[method](mod.in_features, device=device) for name, mod in linears.items()}
    handles = [mod.register_forward_hook(lambda m, args, out, st=stats[name]: st.update(args[0]))
               for name, mod in linears.items()]
    try:
        work()
    finally:
        for h in handles:
            h.remove()
    ran = {name: st for name, st in stats.items() if st.nsamples > 0}
    for name, st in ran.items():
        _check_finite(name, st)
    return ran


def _prune_output_head(model, linears: dict[str, nn.Linear], hidden: list, method: str, device, prune) -> None:
    """Prune ``lm_head`` from the final norm of the last block's outputs (all positions)."""
    head = model.get_output_embeddings()
    for name, mod in linears.items():
        if mod is not head:
            raise AtvSparseError(f"target {name} never ran while the model processed the calibration samples, "
                                 "so it has no statistics; remove it from --targets")
    norm = model.get_decoder().norm
    norm.to(device)
    head.to(device)
    try:
        stats = _stats_while(model, linears, method, device,
                             lambda: [head(norm(h.to(device))) for h in hidden])
    finally:
        norm.to("cpu")
        head.to("cpu")
    for name, mod in linears.items():
        prune(name, mod, stats[name])


class BlockRunner:
    """One block on the compute device with every sample's current inputs.

    ``runner(j)``: the block's output for sample j, (1, T, H) on the device; ``pair(j)``: (x_in,
    x_out); ``block``, ``hidden[j]`` and ``kwargs[j]`` (as the model passes them) for selectors that
    need the block's internals.
    """

    def __init__(self, block, hidden, kwargs, device):
        self.block, self.hidden, self.kwargs, self.device = block, hidden, kwargs, device

    def device_kwargs(self, j: int) -> dict:
        return _to(self.kwargs[j], self.device)

    def __call__(self, j: int) -> torch.Tensor:
        return _block_output(self.block(self.hidden[j].to(self.device), **self.device_kwargs(j)))

    def pair(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_in, x_out) of sample j: what a token selector compares."""
        return self.hidden[j], self(j)


def _collect_stats(run, block_targets, method, selector, num_samples, device, desc, progress):
    """Statistics pass: the dense block on every sample with hooks on its target linears.

    Returns ({name: stats}, {"tokens": positions used per linear, and for vision-language models
    "text_tokens_used" / "visual_tokens_used"}).
    """
    stats = {name: _STATS[method](mod.in_features, device=device) for name, mod in block_targets.items()}
    positions, sample = None, 0
    per_linear = getattr(selector, "linear_positions", None)

    def hook(module, args, output):
        x, name = args[0], module_names[module]
        pos = per_linear(sample, name, output) if per_linear is not None else positions
        if pos is not None:
            x = x[:, pos.to(x.device)]
        stats[name].update(x)

    module_names = {mod: name for name, mod in block_targets.items()}
    handles = [mod.register_forward_hook(hook) for mod in block_targets.values()]
    counts = {"tokens": 0}
    kinds = getattr(selector, "tokens", None)  # SampleTokens per sample, for vision-language models
    if kinds is not None and not per_linear:
        counts.update(text_tokens_used=0, visual_tokens_used=0)
    try:
        for j in tqdm(range(num_samples), desc=desc, disable=not progress, leave=False):
            positions, sample = selector.positions(j), j
            x = run.hidden[j]
            counts["tokens"] += x.shape[0] * x.shape[1] if positions is None else len(positions)
            if "text_tokens_used" in counts:
                used = slice(None) if positions is None else positions
                counts["text_tokens_used"] += int(kinds[j].text[used].sum())
                counts["visual_tokens_used"] += int(kinds[j].visual[used].sum())
            run(j)
    finally:
        for h in handles:
            h.remove()
    for name, st in stats.items():
        _check_finite(name, st)
    return stats, counts


def _prune_linear(mod: nn.Linear, method: str, pattern: Pattern, stats, blocksize: int,
                  percdamp: float) -> torch.Tensor:
    """Prune ``mod.weight`` in place; return its keep-mask (out, in) bool."""
    weight = mod.weight.data
    if method == "magnitude":
        keep = magnitude_mask(weight, **_mask_args(pattern))
    elif method in ("wanda", "tamp"):
        keep = pattern_mask(wanda_score(weight, stats), **_mask_args(pattern))
    else:
        pruned, keep = sparsegpt_prune(weight, stats.hessian, blocksize=blocksize, percdamp=percdamp,
                                       **_mask_args(pattern))
        weight.copy_(pruned)
        return keep
    weight.masked_fill_(~keep, 0)
    return keep


def _mask_args(pattern: Pattern) -> dict:
    return {"n": pattern.n, "m": pattern.m} if pattern.is_nm else {"sparsity": pattern.sparsity}
