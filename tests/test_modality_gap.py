"""atv_sparse.analysis.modality_gap against hand-computed references on fresh random data."""

import zlib

import pytest
import torch
from torch import nn

from atv_sparse.analysis.modality_gap import channel_energy, linear_gap, modality_gap
from atv_sparse.calib import CalibrationSet, SampleTokens

VISUAL_ID = 7


class TwoLinears(nn.Module):
    """input_ids -> embedding -> fc1 -> relu -> fc2: enough to hook two linears."""

    def __init__(self, vocab=16, hidden=8, inter=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, hidden)

    def forward(self, input_ids):
        return self.fc2(torch.relu(self.fc1(self.embed(input_ids))))


def _samples(gen, n, length):
    samples, tokens = [], []
    for _ in range(n):
        ids = torch.randint(0, 16, (1, length), generator=gen)
        samples.append({"input_ids": ids})
        tokens.append(SampleTokens.from_inputs(ids, None, VISUAL_ID))
    return samples, tokens


def _reference_keep(weight, rms, sparsity):
    """Per row, keep all but the int(in * sparsity) lowest |w| * rms (stable order)."""
    keep = torch.ones_like(weight, dtype=torch.bool)
    k = int(weight.shape[1] * sparsity)
    for r in range(weight.shape[0]):
        score = [(float(abs(weight[r, j]) * rms[j]), j) for j in range(weight.shape[1])]
        for _, j in sorted(score, key=lambda t: t[0])[:k]:
            keep[r, j] = False
    return keep


@pytest.mark.parametrize("seed_text", ["a", "b", "c"])
def test_gap_matches_hand_computation(seed_text):
    gen = torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))
    torch.manual_seed(zlib.crc32(seed_text.encode()))
    model = TwoLinears()
    samples, tokens = _samples(gen, 3, 20)
    got = modality_gap(model, {"fc1": model.fc1, "fc2": model.fc2}, samples, tokens)

    ids = torch.cat([s["input_ids"][0] for s in samples])
    x1 = model.embed(ids).detach().double()
    x2 = torch.relu(model.fc1(model.embed(ids))).detach().double()
    visual = ids == VISUAL_ID
    for name, x, lin in (("fc1", x1, model.fc1), ("fc2", x2, model.fc2)):
        rms_t = x[~visual].pow(2).mean(0).sqrt()
        rms_v = x[visual].pow(2).mean(0).sqrt()
        cos = float((rms_t @ rms_v) / (rms_t.norm() * rms_v.norm()))
        assert got[name]["cosine"] == pytest.approx(cos, rel=1e-9)
        assert got[name]["norm_ratio"] == pytest.approx(float(rms_v.norm() / rms_t.norm()), rel=1e-9)
        keep_t = _reference_keep(lin.weight.detach(), rms_t.float(), 0.5)
        keep_v = _reference_keep(lin.weight.detach(), rms_v.float(), 0.5)
        assert got[name]["overlap"] == pytest.approx(float((keep_t & keep_v).sum()) / float(keep_t.sum()))


def test_same_profile_scaled_gives_cosine_one_full_overlap():
    """Visual tokens = text tokens x 2 (exact in fp32): the same channel profile, twice as loud."""
    gen = torch.Generator().manual_seed(11)
    lin = nn.Linear(16, 8)
    text = torch.randn(40, 16, generator=gen)
    energy_in = torch.cat([text, 2 * text])
    kinds = SampleTokens(visual=torch.arange(80) >= 40, text=torch.arange(80) < 40)

    class Feed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    energy = channel_energy(Feed(), {"lin": lin}, [{"x": energy_in.unsqueeze(0)}], [kinds])
    g = linear_gap(lin.weight, energy["lin"])
    assert g["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert g["norm_ratio"] == pytest.approx(2.0, rel=1e-12)
    assert g["overlap"] == 1.0
    assert energy["lin"].text_count == 40 and energy["lin"].visual_count == 40


def test_token_mix_excludes_padding():
    ids = torch.tensor([[VISUAL_ID, VISUAL_ID, VISUAL_ID, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    tokens = [SampleTokens.from_inputs(ids, mask, VISUAL_ID)]
    mix = CalibrationSet([{"input_ids": ids}], tokens, "test").token_mix()
    assert mix == {"visual": 3, "text": 2, "visual_share": pytest.approx(3 / 5)}
