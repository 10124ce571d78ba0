"""How differently a vision-language model's decoder treats visual and text tokens (docs/design.md 4.8).

Three numbers per decoder linear, all from one dense forward pass over calibration samples
(issue 17; they explain why token-selective calibration matters on one model and not another):

- ``cosine``: the cosine between the per-channel activation RMS profiles of text tokens and of
  visual tokens at the linear's input. 1.0 means both kinds of token load the input channels in
  the same proportions (Wanda's ``||X_j||`` ranks the same columns); real LVLMs, whose language
  model met visual tokens only after text pretraining, are expected lower.
- ``norm_ratio``: ``||rms_visual|| / ||rms_text||``, how much louder visual tokens are.
- ``overlap``: the share of kept weights two Wanda masks at 50% unstructured agree on, one scored
  with text-token statistics and one with visual-token statistics (``|keep_t & keep_v| / |keep_t|``;
  both keep the same count per row). 1.0: calibration on either kind keeps the same weights.

The masks are one-shot: every block sees the dense model's activations, which is what Wanda
computes for block 0 exactly; the pruning pipeline feeds later blocks the pruned blocks' output,
so deeper blocks are an approximation of what the sequential pruner sees (cheap, and the same
for both kinds of token).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..calib.calibration_set import SampleTokens
from ..prune.masks import unstructured_mask


@dataclasses.dataclass
class ChannelEnergy:
    """Per-input-channel sums of squared activations, split by token kind.

    text_sq, visual_sq: (in_features,) fp64; text_count, visual_count: tokens summed.
    """

    text_sq: torch.Tensor
    visual_sq: torch.Tensor
    text_count: int = 0
    visual_count: int = 0

    def rms(self, kind: str) -> torch.Tensor:
        """(in_features,) fp64 root mean square over the tokens of ``kind`` ("text" | "visual")."""
        sq, count = (self.text_sq, self.text_count) if kind == "text" else (self.visual_sq, self.visual_count)
        return (sq / max(count, 1)).sqrt()


@torch.no_grad()
def channel_energy(model: nn.Module, targets: dict[str, nn.Linear], samples: list[dict],
                   tokens: list[SampleTokens]) -> dict[str, ChannelEnergy]:
    """Run ``model`` densely on every sample and sum each target's squared inputs per token kind.

    samples: model inputs of one conversation each (``input_ids`` (1, T), ...); tokens: the
    matching visual/text position masks (T,) bool. Returns target name -> ChannelEnergy.
    """
    energy = {name: ChannelEnergy(torch.zeros(lin.in_features, dtype=torch.float64),
                                  torch.zeros(lin.in_features, dtype=torch.float64))
              for name, lin in targets.items()}
    current: list[SampleTokens] = []

    def hook(name):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            kinds = current[0]
            assert x.shape[0] == kinds.visual.numel(), f"{name}: {x.shape[0]} positions, tokens {kinds.visual.numel()}"
            e = energy[name]
            e.text_sq += x[kinds.text.to(x.device)].pow(2).sum(0).cpu()
            e.visual_sq += x[kinds.visual.to(x.device)].pow(2).sum(0).cpu()
            e.text_count += int(kinds.text.sum())
            e.visual_count += int(kinds.visual.sum())
        return record

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in targets.items()]
    try:
        for sample, kinds in zip(samples, tokens, strict=True):
            current[:] = [kinds]
            model(**sample)
    finally:
        for h in handles:
            h.remove()
    return energy


def wanda_keep(weight: torch.Tensor, rms: torch.Tensor, sparsity: float = 0.5) -> torch.Tensor:
    """Wanda's keep-mask for one linear: score |W_ij| * ||X_j||, per-row unstructured.

    weight: (out, in); rms: (in,) activation RMS (a per-channel scale of ``||X_j||``, which ranks
    the same way). Returns keep: (out, in) bool.
    """
    score = weight.detach().abs().float() * rms.float().unsqueeze(0)
    return unstructured_mask(score, sparsity)


def linear_gap(weight: torch.Tensor, energy: ChannelEnergy, sparsity: float = 0.5) -> dict[str, float]:
    """cosine, norm_ratio and Wanda mask overlap (see the module docstring) for one linear."""
    rms_t, rms_v = energy.rms("text"), energy.rms("visual")
    cosine = float(torch.nn.functional.cosine_similarity(rms_t, rms_v, dim=0))
    ratio = float(rms_v.norm() / rms_t.norm()) if rms_t.norm() > 0 else float("inf")
    keep_t, keep_v = wanda_keep(weight, rms_t, sparsity), wanda_keep(weight, rms_v, sparsity)
    overlap = float((keep_t & keep_v).sum() / keep_t.sum())
    return {"cosine": cosine, "norm_ratio": ratio, "overlap": overlap}


def modality_gap(model: nn.Module, targets: dict[str, nn.Linear], samples: list[dict],
                 tokens: list[SampleTokens], sparsity: float = 0.5) -> dict[str, dict[str, float]]:
    """linear name -> {"cosine", "norm_ratio", "overlap"} for every target (model order)."""
    energy = channel_energy(model, targets, samples, tokens)
    return {name: linear_gap(lin.weight, energy[name], sparsity) for name, lin in targets.items()}
