"""The one block walk every pass uses (bottom layer of prune/: it imports nothing else from it).

    hidden, kwargs = capture_block_inputs(model)      run the model up to block 0, per sample
    for b, block in enumerate(layers):                 walk_blocks() yields a BlockStep per block
        residency.bring(block, device)                 materialise / move block b only
        ... the pass's own work on step.run ...        statistics, selection, pruning, a probe
        step.propagate()                               block b's outputs -> block b + 1's inputs
        residency.free(block)                          drop block b before b + 1 is read

The driver (driver.py), the ABS / DBS budget pass (ablation_tokens.py), TAMP's DAS pre-pass
(tamp_tokens.py) and the MoT probe (analysis/mot.py) are all this loop with a different body, so
capture, device moves, propagation and memory follow one block in every one of them.

Where weights live is a ``Residency``: ``Resident`` for a model already in memory (modules only
change device), or ``models.lazy.LazyWeights`` for a skeleton whose weights are read from the
checkpoint's shards when a module is brought and dropped again when it is freed (docs/design.md 3).

A resumed conversion passes a ``BlockJournal``: the blocks an earlier run finished are not
yielded; each is brought, given its pruned weights back (``journal.restore``) and run on every
sample, so block ``journal.done`` gets exactly the inputs it had in the interrupted run.

Also here: the token-selector interface the driver calls (``TokenSelector``) and the check that
calibration statistics are finite, shared by the driver and the MoT probe.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Iterable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AtvSparseError


class Residency(Protocol):
    """Where a model's weights are: ``bring`` makes a module's weights real on ``device``
    (keeping any already there, e.g. just pruned); ``free`` gives their memory back.
    ``skip``: modules under ``module`` that need not come (the output head during capture)."""

    def bring(self, module: nn.Module, device: torch.device, skip: Iterable[nn.Module] = ()) -> None: ...

    def free(self, module: nn.Module) -> None: ...


class Resident:
    """A model fully in host memory: bring moves a module to the compute device, free moves it back."""

    def bring(self, module, device, skip=()):
        module.to(device)  # skip is a memory saving only; moving a module nobody runs is harmless

    def free(self, module):
        module.to("cpu")


RESIDENT = Resident()


class BlockJournal(Protocol):
    """What a resumable run records per block (``atv_sparse.convert.resume.ConversionJournal``).

    ``done``: blocks an earlier run finished (0 for a fresh run); ``reports``: their report dicts;
    ``restore(b, block)``: put block b's pruned weights (as written) into the brought ``block``;
    ``finished(b, report)``: block b is pruned and handed to the sink; ``rebuild_s``: seconds spent
    re-running finished blocks."""

    done: int
    reports: list[dict]
    rebuild_s: float

    def restore(self, block_index: int, block: nn.Module) -> None: ...

    def finished(self, block_index: int, report: dict) -> None: ...


class TokenSelector:
    """Which token positions feed a block's statistics (implementations: selectors.py, tamp_tokens.py).

    ``begin_block(b, runner, num_samples)`` is called once per block before its statistics pass
    (``runner.pair(j) -> (x_in, x_out)`` runs the still-dense block on sample j's current
    inputs); it returns a dict merged into the block's report. ``positions(j)``: the positions
    (1-D int64) of sample j that feed the statistics, or ``None`` for all of them. A selector
    that chooses per linear (TAMP) sets ``per_linear`` and implements ``linear_positions(j, name,
    output)``, called from the hook of linear ``name`` with its output instead of ``positions``.
    ``tokens``: visual / text positions per sample (``calib.SampleTokens``), None for a
    text-only model.
    """

    name = "mixed"
    per_linear = False
    tokens = None

    def begin_block(self, block_index: int, runner: "BlockRunner", num_samples: int) -> dict:
        return {}

    def positions(self, sample_index: int) -> torch.Tensor | None:
        return None

    def linear_positions(self, sample_index: int, name: str, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} selects per block, not per linear")


def check_finite(name: str, values: torch.Tensor) -> None:
    """Statistics of layer ``name`` must be finite: NaN / Inf means the model overflowed on the data."""
    if not torch.isfinite(values).all():
        raise AtvSparseError(f"layer {name}: NaN or Inf in the calibration statistics; the model overflows on "
                             "this data (prune in float32 or bfloat16)")


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for block 0: records its inputs and stops the forward.

    The block is held outside the module tree, so moving or materialising the model for the
    capture never touches block 0's weights."""

    def __init__(self, block: nn.Module, sink: list):
        super().__init__()
        self.__dict__["_block"] = block
        self.sink = sink

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((hidden, {k: v for k, v in kwargs.items()}))
        raise _StopForward

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)  # e.g. attention_type read by the decoder loop


def to_device(obj, device):
    """Tensors inside nested tuples / lists / dicts moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
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
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, samples: list[dict], device: torch.device,
                         progress: bool = True, residency: Residency = RESIDENT) -> tuple[list, list, torch.device]:
    """Run the model up to block 0 for each sample; return (hidden states, kwargs, storage device).

    samples: model inputs per sample (``input_ids`` (1, T) and, for a vision-language model, its
    image inputs), passed to ``model(**sample)``, so vision towers and projectors run densely
    and 3-D M-RoPE positions come out exactly as the model computes them.

    Everything but the blocks (and the output head, which never runs) is brought to ``device``
    for the capture and freed after; block 0 is swapped for a catcher that records
    ``hidden_states`` and the keyword arguments the model passes its layers.
    """
    catcher_sink: list = []
    first = layers[0]
    layers[0] = _InputCatcher(first, catcher_sink)
    kept_aside = [layers[i] for i in range(1, len(layers))]
    for i in range(1, len(layers)):
        layers[i] = nn.Identity()  # out of the module tree while the rest of the model is brought
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hidden, kwargs, previous = [], [], None
    store = None
    try:
        residency.bring(model, device, skip=[head] if head is not None else [])
        for sample in tqdm(samples, desc="Capturing block-0 inputs", disable=not progress, leave=False):
            try:
                model(**to_device(sample, device), use_cache=False)
            except _StopForward:
                pass
            h, kw = catcher_sink.pop()
            if store is None:
                store = storage_device(device, h.numel() * h.element_size() * len(samples) * 2)
            kw = _dedup_kwargs(to_device(kw, store), previous)
            hidden.append(h.to(store))
            kwargs.append(kw)
            previous = kw
    finally:
        residency.free(model)
        layers[0] = first
        for i, block in enumerate(kept_aside, 1):
            layers[i] = block
    return hidden, kwargs, store


def block_output(out):
    """A decoder layer returns a tensor (transformers 5) or a tuple starting with it (older)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockRunner:
    """One block on the compute device with every sample's current inputs.

    ``runner(j)``: the block's output for sample j, (1, T, H) on the device; ``pair(j)``: (x_in,
    x_out); ``block``, ``hidden[j]`` and ``kwargs[j]`` (as the model passes them) for selectors that
    need the block's internals. ``sample_context(j)``, when given, wraps every run of sample j
    (the MoT probe's routing mask).
    """

    def __init__(self, block, hidden, kwargs, device,
                 sample_context: Callable[[int], ContextManager] | None = None):
        self.block, self.hidden, self.kwargs, self.device = block, hidden, kwargs, device
        self.sample_context = sample_context

    def device_kwargs(self, j: int) -> dict:
        return to_device(self.kwargs[j], self.device)

    def __call__(self, j: int) -> torch.Tensor:
        with self.sample_context(j) if self.sample_context else contextlib.nullcontext():
            return block_output(self.block(self.hidden[j].to(self.device), **self.device_kwargs(j)))

    def pair(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_in, x_out) of sample j: what a token selector compares."""
        return self.hidden[j], self(j)


class BlockStep:
    """Block ``index`` of a walk, on the device: ``run`` (its BlockRunner) and ``propagate()``."""

    def __init__(self, index: int, count: int, block: nn.Module, run: BlockRunner, store: torch.device,
                 progress: bool):
        self.index, self.count, self.block, self.run, self.store = index, count, block, run, store
        self.progress = progress

    @property
    def label(self) -> str:
        return f"({self.index + 1}/{self.count})"

    @torch.no_grad()
    def propagate(self, desc: str = "Propagating", before_sample: Callable[[int], None] | None = None) -> None:
        """Replace every sample's hidden state by this block's output on it (the next block's input)."""
        hidden = self.run.hidden
        for j in tqdm(range(len(hidden)), desc=f"{self.label}: {desc}", disable=not self.progress, leave=False):
            if before_sample is not None:
                before_sample(j)
            hidden[j] = self.run(j).to(self.store)


def walk_blocks(model: nn.Module, layers: nn.ModuleList, samples: list[dict] | None, device: torch.device, *,
                residency: Residency = RESIDENT, progress: bool = True,
                sample_context: Callable[[int], ContextManager] | None = None,
                captured: tuple[list, list, torch.device] | None = None,
                journal: BlockJournal | None = None) -> Iterator[BlockStep]:
    """Yield a ``BlockStep`` per decoder block, in order, with only that block brought to ``device``.

    Block-0 inputs are captured first (``captured`` reuses an earlier capture; with no
    ``samples`` nothing is captured and ``step.run`` is None: magnitude pruning). The body does
    its work and calls ``step.propagate()`` when the next block needs this one's outputs; the
    block is freed when the body returns. ``journal``: blocks before ``journal.done`` are
    restored and propagated here instead of yielded.
    """
    if samples:
        hidden, kwargs, store = captured or capture_block_inputs(model, layers, samples, device, progress, residency)
    else:
        hidden, kwargs, store = None, None, None
    done = journal.done if journal is not None else 0
    for b, block in enumerate(layers):
        if b < done and not samples:
            continue  # nothing flows from block to block: a finished block is simply skipped
        residency.bring(block, device)
        try:
            if b < done:
                t0 = time.perf_counter()
                journal.restore(b, block)
                step = BlockStep(b, len(layers), block, BlockRunner(block, hidden, kwargs, device, sample_context),
                                 store, progress)
                step.propagate("Rebuilding inputs (resumed)")
                journal.rebuild_s += time.perf_counter() - t0
                continue
            run = BlockRunner(block, hidden, kwargs, device, sample_context) if samples else None
            yield BlockStep(b, len(layers), block, run, store, progress)
        finally:
            residency.free(block)


__all__ = ["RESIDENT", "BlockJournal", "BlockRunner", "BlockStep", "Resident", "Residency", "TokenSelector",
           "block_output", "capture_block_inputs", "check_finite", "storage_device", "to_device", "walk_blocks"]
