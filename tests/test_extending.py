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

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from atv_sparse.calib import load_calibration
from atv_sparse.convert import run
from atv_sparse.formats.bitmask import unpack_bitmask
from atv_sparse.models import adapter_for, read_config
from atv_sparse.prune.recipe import METHODS, SELECTORS, Method, Selector
from atv_sparse.prune.rule import PruningRule
from atv_sparse.prune.walk import TokenSelector
from atv_sparse.prune.wanda import WandaStats

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
    """Wanda 2:4 from the given rows: ``WandaStats`` fed one sample at a time, then a per-group top 2."""
    stats = WandaStats(weight.shape[1])
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
