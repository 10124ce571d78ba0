"""Text perplexity of any causal language model (Wanda's WikiText protocol)."""

from __future__ import annotations

import math

import torch

from ..errors import AtvSparseError
from .prompts import tokenizer_of


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, seqlen: int = 256, source: str = "text") -> dict:
    """Perplexity over the consecutive non-overlapping full windows of ``seqlen`` tokens, each scored
    from its own start, as Wanda's WikiText evaluation does (``eval_ppl_wikitext``): the trailing
    ``tokens % seqlen`` tokens that do not fill a window are dropped, and the result is
    ``exp(sum of token NLL / predicted tokens)``, ``seqlen - 1`` predicted tokens per window.
    Returns {ppl, tokens, windows, seqlen, dropped}."""
    if seqlen < 2:
        raise AtvSparseError(f"--seqlen must be at least 2, got {seqlen}")
    ids = tokenizer_of(tokenizer)(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = ids.numel() // seqlen
    if windows == 0:
        raise AtvSparseError(f"{source}: {ids.numel()} token(s), fewer than one window of --seqlen {seqlen}; "
                             "give more text or a smaller --seqlen")
    device = next(model.parameters()).device
    total = 0.0
    for k in range(windows):
        window = ids[k * seqlen:(k + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum"))
    return {"ppl": math.exp(total / (windows * (seqlen - 1))), "tokens": int(ids.numel()), "windows": windows,
            "seqlen": seqlen, "dropped": int(ids.numel() - windows * seqlen)}
