"""A minimal Llama decoder for end-to-end decode timing (gpt-fast style), dense or sparse.

Pre-norm blocks with fused q/k/v and fused gate/up linears, RoPE, grouped-query attention over a
static KV cache (so one decode step has fixed shapes and a CUDA graph can capture it), greedy
sampling. ``sparsify`` swaps every decoder linear for an ``atv_sparse.SparseLinear`` (magnitude
N:M), one layer at a time, so the dense and the sparse model never coexist. ``from_hf`` copies a
``LlamaForCausalLM``'s weights in, which is how the CPU test checks this module against
``transformers``.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class LlamaShape:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    intermediate: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


LLAMA3_8B = LlamaShape()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Block(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.s = s
        self.attention_norm = RMSNorm(s.dim, s.norm_eps)
        self.ffn_norm = RMSNorm(s.dim, s.norm_eps)
        self.wqkv = nn.Linear(s.dim, (s.n_heads + 2 * s.n_kv_heads) * s.head_dim, bias=False)
        self.wo = nn.Linear(s.n_heads * s.head_dim, s.dim, bias=False)
        self.w_gate_up = nn.Linear(s.dim, 2 * s.intermediate, bias=False)  # gate rows, then up rows
        self.w_down = nn.Linear(s.intermediate, s.dim, bias=False)

    def gate_up(self, x):
        if getattr(self.w_gate_up, "gated", False):  # a gated SparseLinear returns silu(g) * u itself
            return self.w_gate_up(x)
        g, u = self.w_gate_up(x).chunk(2, dim=-1)
        return F.silu(g) * u

    def forward(self, x, cos, sin, pos, mask, cache_k, cache_v):
        s, (b, t, _) = self.s, x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).split(
            [s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim], dim=-1)
        q = q.view(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        cache_k.index_copy_(2, pos, k)
        cache_v.index_copy_(2, pos, v)
        kk = cache_k.repeat_interleave(s.n_heads // s.n_kv_heads, dim=1)
        vv = cache_v.repeat_interleave(s.n_heads // s.n_kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        x = x + self.wo(att.transpose(1, 2).reshape(b, t, -1))
        return x + self.w_down(self.gate_up(self.ffn_norm(x)))


class LlamaDecoder(nn.Module):
    def __init__(self, s: LlamaShape, max_seq: int, batch: int = 1):
        super().__init__()
        self.s, self.max_seq = s, max_seq
        self.tok_embeddings = nn.Embedding(s.vocab, s.dim)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.n_layers))
        self.norm = RMSNorm(s.dim, s.norm_eps)
        self.output = nn.Linear(s.dim, s.vocab, bias=False)
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        shape = (s.n_layers, batch, s.n_kv_heads, max_seq, s.head_dim)
        self.register_buffer("cache_k", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape), persistent=False)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64 at positions pos: (T,) int64 -> logits (B, T, vocab)."""
        x = self.tok_embeddings(tokens)
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = torch.arange(self.max_seq, device=x.device)[None, :] <= pos[:, None]  # (T, max_seq)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, pos, mask, self.cache_k[i], self.cache_v[i])
        return self.output(self.norm(x))


def init_random(model: LlamaDecoder, std: float = 0.02, seed: int = 0) -> None:
    """Fast random weights in place (normal, RMSNorm weights 1)."""
    gen = torch.Generator(device=model.output.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)


def from_hf(hf_model) -> LlamaDecoder:
    """A ``LlamaDecoder`` with the weights of a ``LlamaForCausalLM`` (default RoPE only)."""
    c = hf_model.config
    s = LlamaShape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                   c.intermediate_size, c.vocab_size, c.rope_parameters["rope_theta"] if getattr(
                       c, "rope_parameters", None) else c.rope_theta, c.rms_norm_eps)
    assert getattr(c, "head_dim", s.head_dim) == s.head_dim
    model = LlamaDecoder(s, max_seq=64)
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(hf_model.model.embed_tokens.weight)
        model.norm.weight.copy_(hf_model.model.norm.weight)
        model.output.weight.copy_(hf_model.lm_head.weight)
        for mine, theirs in zip(model.layers, hf_model.model.layers, strict=True):
            a, mlp = theirs.self_attn, theirs.mlp
            mine.attention_norm.weight.copy_(theirs.input_layernorm.weight)
            mine.ffn_norm.weight.copy_(theirs.post_attention_layernorm.weight)
            mine.wqkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            mine.wo.weight.copy_(a.o_proj.weight)
            mine.w_gate_up.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            mine.w_down.weight.copy_(mlp.down_proj.weight)
    return model


def sparsify(model: LlamaDecoder, pattern: str, backend: str = "auto") -> None:
    """Magnitude-prune every decoder linear to ``pattern`` and replace it by a ``SparseLinear``,
    freeing each dense weight as soon as its compressed form exists."""
    from atv_sparse.nn.sparse_linear import SparseLinear

    for i, block in enumerate(model.layers):
        for attr in ("wqkv", "wo", "w_gate_up", "w_down"):
            dense = getattr(block, attr)
            sparse = SparseLinear.from_linear(dense, pattern, gated=attr == "w_gate_up", backend=backend,
                                              name=f"layers.{i}.{attr}")
            setattr(block, attr, sparse)
            del dense


@torch.no_grad()
def generate(model: LlamaDecoder, prompt: torch.Tensor, new_tokens: int, cuda_graph: bool) -> tuple[torch.Tensor, float]:
    """Greedy decode ``new_tokens`` after ``prompt`` (B, T); returns (tokens (B, new), decode seconds)."""
    device = prompt.device
    model.cache_k.zero_()
    model.cache_v.zero_()
    t = prompt.shape[1]
    logits = model(prompt, torch.arange(t, device=device))
    tok = logits[:, -1:].argmax(-1)
    pos = torch.tensor([t], device=device)
    out = torch.empty(prompt.shape[0], new_tokens, dtype=torch.long, device=device)

    def step(i_tensor):
        nxt = model(tok, pos)[:, -1:].argmax(-1)
        tok.copy_(nxt)
        pos.add_(1)
        return nxt

    if cuda_graph:
        # warm up on a side stream (kernel autotuning, cuBLAS handles), then restore the state
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        saved = tok.clone(), pos.clone()
        with torch.cuda.stream(side):
            for _ in range(2):
                step(None)
        torch.cuda.current_stream().wait_stream(side)
        tok.copy_(saved[0])
        pos.copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_next = step(None)
        tok.copy_(saved[0])
        pos.copy_(saved[1])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(new_tokens):
            out[:, i] = tok[:, 0]
            graph.replay()
        torch.cuda.synchronize()
        del static_next
        return out, time.perf_counter() - start
    start = time.perf_counter()
    for i in range(new_tokens):
        out[:, i] = tok[:, 0]
        step(None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
