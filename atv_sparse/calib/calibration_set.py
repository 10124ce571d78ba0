"""What a pruning run is fed: the calibration samples and which of their positions are visual or text.

Plain data, below everything that builds it (``samples.load_calibration``) and everything that
reads it (``prune/``: the pipeline, the token selectors, TAMP's DAS; ``analysis/``).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SampleTokens:
    """Which positions of one calibration sample are visual or text. visual, text: (T,) bool."""

    visual: torch.Tensor
    text: torch.Tensor

    @classmethod
    def from_inputs(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    image_token_id: int | None) -> "SampleTokens":
        """input_ids: (1, T); padding (attention_mask 0) is neither text nor visual."""
        ids = input_ids[0]
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask[0].bool()
        visual = (ids == image_token_id) & real if image_token_id is not None else torch.zeros_like(real)
        return cls(visual=visual.cpu(), text=(real & ~visual).cpu())


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """samples: model inputs per sample, each at least ``input_ids`` (1, T) int64, ready for
    ``model(**sample)``; tokens: their visual / text positions, one per sample (None for a text-only
    model); source: where they came from (a file name, or a description of the embedded default)."""

    samples: list[dict]
    tokens: list[SampleTokens] | None
    source: str

    def token_mix(self) -> dict | None:
        """{"visual": positions, "text": positions, "visual_share": visual / all} over all samples
        (padding is neither; the paper's models: ~90% visual); None for a text-only model's calibration."""
        if self.tokens is None:
            return None
        visual = sum(int(t.visual.sum()) for t in self.tokens)
        text = sum(int(t.text.sum()) for t in self.tokens)
        return {"visual": visual, "text": text, "visual_share": visual / max(visual + text, 1)}


__all__ = ["CalibrationSet", "SampleTokens"]
