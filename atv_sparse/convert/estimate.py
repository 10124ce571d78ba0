"""What a conversion will need, from shapes alone: output bytes and the streamed run's peak memory.

``convert`` prints it before any weight is read (``--dry-run``) and checks the output's file
system against it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats.bitmask import packed_nbytes
from ..formats.dtypes import DTYPE_BYTES
from ..patterns import Pattern
from ..prune.rule import PruningRule
from ..prune.targets import TargetPlan

# Resident memory of the Python process with torch and transformers imported, before any weight.
RUNTIME_BYTES = 600 * 10**6


def estimate_conversion(skeleton: nn.Module, adapter, plan: TargetPlan, tensors: dict, pattern: Pattern,
                        device: torch.device, *, packed: bool, rule: PruningRule, calibrated: bool,
                        nsamples: int, seqlen: int) -> dict:
    """Output bytes and the streamed run's peak memory, from shapes alone.

    skeleton: the model on the meta device (``adapter.open_lazy``); tensors: the checkpoint's
    tensor name -> (file, header info); packed: bitmask + values output (else dense); rule: the
    run's pruning rule (``PruneRecipe.rule``), which estimates its own statistics; calibrated: whether calibration activations are cached
    (``nsamples`` windows of ``seqlen`` tokens).

    Memory follows one phase at a time: the capture (everything outside the blocks but the output
    head, plus the cached activations), one block (its weights, its statistics: fp32 vectors for
    Wanda, fp32 Hessians and SparseGPT's working copies, the activations, its packed output until
    written), and the output head when it is a target. Statistics and activations count on the
    host when the compute device is the CPU.
    """
    element = next(skeleton.parameters()).element_size()
    src_bytes = sum(math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]] for _, info in tensors.values())
    model_bytes = sum(p.numel() * element for p in skeleton.parameters())

    def packed_delta(lin) -> int:
        kept = lin.out_features * (lin.in_features - int(lin.in_features * pattern.sparsity))
        return packed_nbytes(lin.out_features, lin.in_features, kept, element) - lin.weight.numel() * element

    out_bytes = model_bytes + (sum(packed_delta(lin) for lin in plan.targets.values()) if packed else 0)
    layers = adapter.decoder_layers(skeleton)
    block_bytes = max(sum(p.numel() * element for p in block.parameters()) for block in layers)
    hidden = skeleton.config.get_text_config().hidden_size
    acts = 2 * nsamples * seqlen * hidden * element if calibrated else 0  # inputs + outputs
    prefix = adapter.layers_prefix(skeleton) + ".0."
    block0 = [lin for name, lin in plan.targets.items() if name.startswith(prefix)] or list(plan.targets.values())
    stats = rule.stats_bytes(block0)
    on_host = device.type == "cpu"
    head = skeleton.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    tied = head is not None and any(id(p) in head_params for p in skeleton.get_input_embeddings().parameters())
    block_params = {id(p) for block in layers for p in block.parameters()}
    outside = sum(p.numel() * element for p in skeleton.parameters()
                  if id(p) not in block_params and (tied or id(p) not in head_params))
    phases = {"capture": outside + acts,
              "block": block_bytes + (stats + acts if on_host else 0) + block_bytes}  # + its output until written
    if any(lin is head for lin in plan.targets.values()):
        phases["output head"] = sum(p.numel() * element for p in head.parameters()) + acts
    phase = max(phases, key=phases.get)
    return {"input_bytes": src_bytes, "output_bytes": out_bytes, "runtime_bytes": RUNTIME_BYTES,
            "peak_host_bytes": RUNTIME_BYTES + phases[phase], "peak_phase": phase, "peak_block_bytes": block_bytes,
            "peak_device_bytes": block_bytes + stats, "activation_bytes": acts}
