"""A block's own queries and keys, as its attention sees them (after the model's RoPE).

TAMP and ABS score tokens by attention. Rather than re-implementing attention, the block runs
densely with hooks on q_proj / k_proj (bias included, input-normed hidden state), and the
``apply_rotary_pos_emb`` of the attention module's own modelling file is applied with the
``position_embeddings`` the model passed the block (Qwen's M-RoPE arrives already merged).
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator

import torch

from ..errors import AtvSparseError


@torch.no_grad()
def roped_qk(runner, samples: Iterable[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each sample j, run the block and yield (j, q, k): q (heads_q, T, d), k (heads_kv, T, d)."""
    attn = runner.block.self_attn
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise AtvSparseError(f"{type(attn).__name__} has no apply_rotary_pos_emb to rebuild its queries and keys")
    captured = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))]
    try:
        for j in samples:
            runner(j)
            d = attn.head_dim
            q = captured["q"].view(1, captured["q"].shape[1], -1, d).transpose(1, 2)
            k = captured["k"].view(1, captured["k"].shape[1], -1, d).transpose(1, 2)
            cos, sin = runner.device_kwargs(j)["position_embeddings"]
            q, k = rope(q, k, cos, sin)
            yield j, q[0], k[0]
    finally:
        for h in hooks:
            h.remove()
