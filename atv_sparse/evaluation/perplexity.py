"""Text perplexity of any causal language model (Wanda's WikiText protocol)."""

from __future__ import annotations

import math

import torch

from ..errors import AtvSparseError
from .prompts import tokenizer_of


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, seqlen: int = 256, source: str = "text") -> dict:
    """Perplexity over consecutive non-overlapping windows of ``seqlen`` tokens (the last, shorter
    window included), each scored from its own start, as Wanda's WikiText evaluation does:
    ``exp(sum of token NLL / predicted tokens)``. Returns {ppl, tokens, windows}."""
    if seqlen < 2:
        raise AtvSparseError(f"--seqlen must be at least 2, got {seqlen}")
    ids = tokenizer_of(tokenizer)(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise AtvSparseError(f"{source}: {ids.numel()} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    total, count, windows = 0.0, 0, 0
    for start in range(0, ids.numel() - 1, seqlen):
        window = ids[start:start + seqlen].unsqueeze(0).to(device)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total += float(nll)
        count += window.shape[1] - 1
        windows += 1
    return {"ppl": math.exp(total / count), "tokens": int(ids.numel()), "windows": windows, "seqlen": seqlen}
