"""Fail before work: every precondition of a run is checked before any weight is read or any
calibration pass starts; each failure is one ``error:`` line, exit 2, nothing written."""

import json
import shutil
import sys
from collections import namedtuple

import pytest
import torch
from PIL import Image

from atv_sparse.convert import cli, preflight
from atv_sparse.models.lazy import LazyWeights
from atv_sparse.tinybench.model import bundled_model_dir
from test_bad_input import fails


class WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Any calibration pass, calibration-data build or weight load fails the test."""
    def started(what):
        def boom(*args, **kwargs):
            raise WorkStarted(what)
        return boom
    monkeypatch.setattr(cli, "prune_model", started("a calibration pass started"))
    monkeypatch.setattr(LazyWeights, "read", started("weights were read"))
    return started


@pytest.fixture
def text_ckpt(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "ckpt")
    return tmp_path, tmp_path / "ckpt"


@pytest.fixture
def vlm_ckpt(tmp_path):
    shutil.copytree(bundled_model_dir(), tmp_path / "vlm")
    return tmp_path, tmp_path / "vlm"


def test_plot_without_matplotlib_fails_before_calibration(capsys, monkeypatch, no_work, vlm_ckpt):
    root, ckpt = vlm_ckpt
    monkeypatch.setattr(cli, "load_calibration", no_work("calibration data was built"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError, find_spec -> None
    fails(capsys, [ckpt, "--method", "atv", "--plot", "--out", root / "o", "--quiet"],
          "--plot", "matplotlib", "pip install", root=root)
    # the embedded default (no CKPT) too: its output would go to a new temp dir
    fails(capsys, ["--method", "atv", "--plot", "--quiet"], "--plot", "matplotlib")


def test_output_under_a_file(capsys, no_work, text_ckpt):
    root, ckpt = text_ckpt
    (root / "plain.txt").write_text("x")
    fails(capsys, [ckpt, "--out", root / "plain.txt" / "sub" / "o"], "plain.txt", "not a directory", root=root)


def test_output_not_writable(capsys, monkeypatch, no_work, text_ckpt):
    root, ckpt = text_ckpt
    # root ignores permission bits, so the refusal of the file system is simulated
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    fails(capsys, [ckpt, "--out", root / "new" / "o"], f"cannot write in {root}", root=root)


def test_not_enough_disk_space(capsys, monkeypatch, no_work, text_ckpt):
    root, ckpt = text_ckpt
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    fails(capsys, [ckpt, "--out", root / "o"], str(root / "o"), "GB free", "needs about", root=root)


def test_bad_calibration_record_fails_before_weights(capsys, no_work, vlm_ckpt):
    root, ckpt = vlm_ckpt
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "ok.png")
    (root / "not-an-image.png").write_bytes(b"this is text, not a PNG")
    records = [{"image": "ok.png", "text": "A red square."}, {"image": "not-an-image.png", "text": "Broken."}]
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fails(capsys, [ckpt, "--method", "atv", "--calib", root / "calib.jsonl", "--nsamples", "2",
                   "--out", root / "o", "--quiet"], "not-an-image.png", root=root)
    records[1] = {"image": "ok.png"}  # no text and no conversations
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fails(capsys, [ckpt, "--method", "atv", "--calib", root / "calib.jsonl", "--nsamples", "2",
                   "--out", root / "o", "--quiet"], "calib.jsonl", root=root)


def test_vlm_without_chat_template(capsys, monkeypatch, no_work, vlm_ckpt):
    root, ckpt = vlm_ckpt
    monkeypatch.setattr(cli, "load_calibration", no_work("calibration data was built"))
    (ckpt / "chat_template.jinja").unlink()
    fails(capsys, [ckpt, "--method", "atv", "--out", root / "o", "--quiet"], str(ckpt), "no chat template", root=root)
    # magnitude needs no calibration, but the dense-vs-pruned evaluation renders the template too
    fails(capsys, [ckpt, "--method", "magnitude", "--eval-per-task", "2", "--out", root / "o", "--quiet"],
          "no chat template", root=root)


def test_vlm_without_processor(capsys, monkeypatch, no_work, vlm_ckpt):
    root, ckpt = vlm_ckpt
    monkeypatch.setattr(cli, "load_calibration", no_work("calibration data was built"))
    (ckpt / "processor_config.json").unlink()
    fails(capsys, [ckpt, "--method", "atv", "--out", root / "o", "--quiet"], str(ckpt), "processor", root=root)


def test_device_that_does_not_exist(capsys, monkeypatch, no_work, text_ckpt):
    root, ckpt = text_ckpt
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    fails(capsys, [ckpt, "--device", "cuda:7", "--out", root / "o"], "cuda:7", "2 CUDA device(s)", root=root)
    monkeypatch.undo()
    if not torch.backends.mps.is_available():
        fails(capsys, [ckpt, "--device", "mps", "--out", root / "o"], "--device mps", "no mps device", root=root)


def test_budget_from_is_read_before_work(capsys, monkeypatch, no_work, vlm_ckpt):
    root, ckpt = vlm_ckpt
    monkeypatch.setattr(cli, "load_calibration", no_work("calibration data was built"))
    base = [ckpt, "--method", "wanda", "--calib-tokens", "abs", "--out", root / "o", "--quiet"]
    fails(capsys, [*base, "--budget-from", root / "missing.json"], "missing.json", "cannot read", root=root)
    (root / "report.json").write_text('{"blocks": [{"k_mean": 3}]}')
    fails(capsys, [*base, "--budget-from", root / "report.json"], "report.json", "visual_tokens", root=root)
    (root / "report.json").write_text('{"blocks": [{"visual_tokens": 3}]}')
    fails(capsys, [ckpt, "--method", "atv", "--budget-from", root / "report.json", "--out", root / "o"],
          "--budget-from applies to", root=root)


def test_dry_run_runs_the_checks(capsys, monkeypatch, no_work, text_ckpt):
    root, ckpt = text_ckpt
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    fails(capsys, [ckpt, "--dry-run", "--out", root / "o"], "GB free", root=root)
