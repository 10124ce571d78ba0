"""docs/design.md 10, done: a toy pruning rule, a toy token selector and a toy kernel backend, each
added through its documented table only (registered inside the test) and run end to end through
``python -m atv_sparse.convert`` / ``atv_sparse.load``.

Each toy is checked against a direct computation written here, not against the code it plugs into:
block 0's linears see the dense model's activations (the statistics pass runs the dense block), so
their masks follow from hooks on the dense model alone.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import atv_sparse
from atv_sparse.calib import load_calibration
from atv_sparse.convert import run
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import unpack_bitmask
from atv_sparse.models import adapter_for, read_config
from atv_sparse.ops import backends
from atv_sparse.ops.backends import Backend
from atv_sparse.prune.recipe import METHODS, SELECTORS, Method, Selector
from atv_sparse.prune.rule import PruningRule
from atv_sparse.prune.walk import TokenSelector
from reference_pruners import RefWandaStats

NSAMPLES, SEQLEN = 2, 32
BLOCK0 = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


# --- (a) a pruning rule -------------------------------------------------------------------------

class MeanAbsStats:
    """Per input column, the mean over samples of mean_t |x_t|."""

    def __init__(self, in_features, device):
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.nsamples = 0

    def update(self, x):
        self.total += x.reshape(-1, x.shape[-1]).abs().double().mean(0)
        self.nsamples += 1


@dataclasses.dataclass(frozen=True)
class MeanAbsRule(PruningRule):
    """Score |W| * (mean |x|) ** power, keep the top N of every M (N:M only)."""

    name = "mean-abs"
    power: float = 1.0
    STATS_BYTES = 12345  # a value no real estimate gives, to see that the estimate asked this rule

    def new_stats(self, in_features, device):
        return MeanAbsStats(in_features, device)

    def statistic(self, stats):
        return stats.total

    def prune(self, weight, stats, pattern):
        score = weight.abs().double() * (stats.total / stats.nsamples) ** self.power
        groups = score.reshape(weight.shape[0], -1, pattern.m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(pattern.n, dim=-1).indices, True)
        keep = keep.reshape(weight.shape)
        weight.masked_fill_(~keep, 0)
        return keep

    def stats_bytes(self, linears):
        return self.STATS_BYTES

    def settings(self):
        return {"power": self.power}


def block0_inputs(ckpt, positions=None):
    """{short name: [input rows (T, in) fp32 per calibration sample]} of block 0's linears in the dense model."""
    adapter = adapter_for(read_config(ckpt), ckpt)
    calibration = load_calibration(ckpt, adapter, nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in BLOCK0}
    block = model.model.layers[0]
    hooks = [block.get_submodule(name).register_forward_hook(
        lambda m, args, out, name=name: seen[name].append(args[0][0].detach().float())) for name in BLOCK0]
    with torch.no_grad():
        for sample in calibration.samples:
            model(**sample, use_cache=False)
    for h in hooks:
        h.remove()
    return model, seen


def written_keep(out, name, in_features):
    tensors = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    return unpack_bitmask(tensors[f"model.layers.0.{name}.weight_bitmask"], in_features)


def test_a_rule_added_through_methods_runs_end_to_end(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, "mean-abs", Method(MeanAbsRule, "mixed"))
    args = [str(tiny_llama), "--method", "mean-abs", "--pattern", "2:4", "--nsamples", str(NSAMPLES),
            "--seqlen", str(SEQLEN), "--quiet"]
    estimate = run(args + ["--dry-run"])
    assert estimate["peak_device_bytes"] == estimate["peak_block_bytes"] + MeanAbsRule.STATS_BYTES
    out = tmp_path / "out"
    run(args + ["--out", str(out)])

    dense, inputs = block0_inputs(tiny_llama)
    for name in BLOCK0:
        weight = dense.model.layers[0].get_submodule(name).weight.detach()
        mean_abs = torch.stack([x.double().abs().mean(0) for x in inputs[name]]).mean(0)
        score = weight.abs().double() * mean_abs
        expected = torch.zeros_like(weight, dtype=torch.bool)
        for row in range(weight.shape[0]):  # the two largest of every four columns, one group at a time
            for g in range(0, weight.shape[1], 4):
                top = sorted(range(4), key=lambda k: -score[row, g + k].item())[:2]
                expected[row, [g + k for k in top]] = True
        assert torch.equal(written_keep(out, name, weight.shape[1]), expected), name
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["method"] == "mean-abs" and qconfig["method_settings"]["power"] == 1.0
    assert json.loads((out / "prune_report.json").read_text())["settings"]["power"] == 1.0


# --- (b) a token selector -----------------------------------------------------------------------

class EvenPositions(TokenSelector):
    """Positions 0, 2, 4, ... of every sample (their count is learnt from the block's inputs)."""

    name = "even"

    def __init__(self, tokens):
        self.tokens = tokens
        self.lengths: list[int] = []

    def begin_block(self, block_index, runner, num_samples):
        self.lengths = [runner.hidden[j].shape[1] for j in range(num_samples)]
        return {"even_positions": sum((n + 1) // 2 for n in self.lengths)}

    def positions(self, j):
        return torch.arange(0, self.lengths[j], 2)


def wanda_keep(weight, rows_per_sample):
    """Wanda 2:4 from the given rows: the upstream statistics (``RefWandaStats``, wanda's own arithmetic)
    fed one sample at a time, then a per-group top 2."""
    stats = RefWandaStats(weight.shape[1])
    for rows in rows_per_sample:
        stats.update(rows[None])
    score = weight.abs() * stats.scaler_row.sqrt()
    groups = score.reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def test_a_selector_added_through_selectors_runs_end_to_end(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setitem(SELECTORS, "even", Selector(lambda tokens, selection, seed: EvenPositions(tokens),
                                                    text_only=True))
    out = tmp_path / "out"
    run([str(tiny_llama), "--method", "wanda", "--calib-tokens", "even", "--pattern", "2:4", "--nsamples",
         str(NSAMPLES), "--seqlen", str(SEQLEN), "--out", str(out), "--quiet"])

    dense, inputs = block0_inputs(tiny_llama)
    differs = False
    for name in BLOCK0:
        weight = dense.model.layers[0].get_submodule(name).weight.detach()
        expected = wanda_keep(weight, [x[0::2] for x in inputs[name]])
        assert torch.equal(written_keep(out, name, weight.shape[1]), expected), name
        differs |= not torch.equal(expected, wanda_keep(weight, inputs[name]))
    assert differs  # the selection mattered: every position would have given other masks
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["calib_tokens"] == "even"
    assert report["blocks"][0]["even_positions"] == NSAMPLES * SEQLEN // 2
    assert report["blocks"][0]["tokens"] == NSAMPLES * SEQLEN // 2


# --- (d) a kernel backend -----------------------------------------------------------------------

def add_backend(monkeypatch, entry: Backend) -> None:
    """``ops/backends.py`` as if ``entry`` were one more row of its ``TABLE``, for this test only.

    The table's derived names (``BACKENDS``, ``KERNEL_BACKENDS``, ``LAYOUT_BACKENDS``) are tuples
    that other modules bind when they are imported, so every module holding the table's tuple gets
    the new one; ``FACTS`` and ``TOKEN_LIMITS`` are shared dicts.
    """
    table = backends.TABLE + (entry,)
    derived = {"TABLE": table,
               "BACKENDS": ("auto", *(b.name for b in table if b.choosable)),
               "KERNEL_BACKENDS": tuple(b.name for b in table if b.kernel),
               "LAYOUT_BACKENDS": tuple(b.name for b in table if b.layout is not None)}
    old = {name: getattr(backends, name) for name in derived}
    for module in [m for name, m in sys.modules.items() if name == "atv_sparse" or name.startswith("atv_sparse.")]:
        for name, value in derived.items():
            if getattr(module, name, None) is old[name]:
                monkeypatch.setattr(module, name, value)
    monkeypatch.setitem(backends.FACTS, entry.name, entry)
    if entry.token_limit is not None:
        monkeypatch.setitem(backends.TOKEN_LIMITS, entry.name, entry.token_limit)


def toy_dense_weight(bitmask, values, in_features):
    """The dense weight from the checkpoint pair, bit by bit (little-endian bits, kept values row-major)."""
    out = bitmask.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8)
    keep = ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(out, -1)[:, :in_features]
    dense = torch.zeros(out, in_features, dtype=values.dtype)
    dense[keep] = values.reshape(-1)
    return dense


CALLS: list[int] = []


def run_toy(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout):
    CALLS.append(x.shape[-2] if x.dim() > 1 else 1)
    y = x @ toy_dense_weight(bitmask, values, in_features).t()
    if bias is not None:
        y = y + bias
    if gated:
        half = y.shape[-1] // 2
        y = torch.nn.functional.silu(y[..., :half]) * y[..., half:]
    return y


def test_a_backend_added_to_the_table_runs_a_loaded_model(tiny_llama, calib_txt, monkeypatch, tmp_path):
    add_backend(monkeypatch, Backend("toy", machine=lambda device: None if device.type == "cpu" else "CPU only",
                                     layer=lambda n, m, dtype, out_f, in_f: None if m is not None else "N:M only",
                                     run=run_toy, kernel=False))
    common = [str(tiny_llama), "--method", "wanda", "--calib", str(calib_txt), "--nsamples", str(NSAMPLES),
              "--seqlen", str(SEQLEN), "--quiet"]
    run(common + ["--out", str(tmp_path / "packed")])
    run(common + ["--out", str(tmp_path / "dense"), "--format", "dense"])

    sparse = atv_sparse.load(tmp_path / "packed", backend="toy", progress=False)
    linears = [m for m in sparse.modules() if isinstance(m, atv_sparse.SparseLinear)]
    assert len(linears) == 14 and all(m.plan.pick(1)[0] == "toy" for m in linears)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(28))
    CALLS.clear()
    with torch.no_grad():
        got, want = sparse(input_ids=ids).logits, dense(input_ids=ids).logits
    assert CALLS == [9] * len(linears)  # every pruned linear ran on the toy backend, once
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(AtvSparseError, match="backend 'toy' cannot run here: N:M only"):
        atv_sparse.SparseLinear(16, 8, atv_sparse.parse_pattern("unstructured", 0.5), num_values=64,
                                backend="toy").prepare()
