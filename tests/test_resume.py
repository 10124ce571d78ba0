"""Resuming a killed conversion (``convert --resume``): the output equals an uninterrupted run's.

A conversion runs in a subprocess (``kill_convert.py``) that is SIGKILLed, or sent SIGINT /
SIGTERM, at a chosen point; ``--resume`` with the same arguments then finishes it in this
process, and every output file is compared by SHA-256 with an uninterrupted run's
(prune_report.json: every field but the timings and the ``resumed`` record, which differ between
any two runs). This file runs a subset that crosses every kill point, every method and both
families once; ``tests/kill_matrix.py`` runs the whole product.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from atv_sparse.convert import main, run
from atv_sparse.formats.staging import JOURNAL_NAME, staging_path
from atv_sparse.tinybench.families import TEXT_DIMS, write_tiny_vlm
from conftest import write_tiny_model
from kill_convert import convert_in_subprocess, digests, kill_then_resume

TEXT = ["--nsamples", "3", "--seqlen", "24", "--quiet", "--max-shard-size", "40KB"]
VLM = ["--nsamples", "2", "--quiet", "--max-shard-size", "60KB"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    return {"llama": write_tiny_model(base / "llama", "llama", num_hidden_layers=4),
            "llava_next": write_tiny_vlm(base / "llava_next", "llava_next",
                                         text_dims={**TEXT_DIMS, "num_hidden_layers": 3})}


_references: dict[tuple, dict] = {}


def reference(tmp_path_factory, argv: list[str]) -> dict[str, str]:
    """Digests of an uninterrupted run of ``argv`` (once per argument list)."""
    key = tuple(argv)
    if key not in _references:
        out = tmp_path_factory.mktemp("ref") / "out"
        run([*argv, "--out", str(out)])
        _references[key] = digests(out)
    return _references[key]


def resumed_equals_reference(tmp_path, tmp_path_factory, argv, spec, expect_rc=-9):
    proc = kill_then_resume(tmp_path / "out", argv, spec, expect_rc)
    assert digests(tmp_path / "out") == reference(tmp_path_factory, argv)
    return proc


# (checkpoint, method arguments, kill points): each point once, each method once, both families.
CASES = [
    ("llama", ["--method", "wanda"], ["capture:2", "prune:9", "block:2", "shard:3", "finish:1", "commit:1",
                                      "rename:1", "renamed:1"]),
    ("llama", ["--method", "sparsegpt", "--pattern", "unstructured", "--format", "dense"], ["prune:16"]),
    ("llama", ["--method", "magnitude", "--pattern", "4:8"], ["block:1"]),
    ("llava_next", ["--method", "atv"], ["prune:10", "shard:4"]),
    ("llava_next", ["--method", "atv-sparsegpt"], ["block:2"]),
    # capture:3 is the driver's capture, after DAS's dense pre-pass (which the resume runs again)
    ("llava_next", ["--method", "tamp", "--das", "--pattern", "unstructured"], ["block:1", "capture:3"]),
    ("llava_next", ["--method", "tamp"], ["capture:2"]),
    ("llava_next", ["--method", "wanda", "--calib-tokens", "abs"], ["block:2"]),
    # linears outside the blocks: the projector is pruned again on resume, lm_head after the last block
    ("llava_next", ["--method", "wanda", "--targets", "re:model[.]language_model[.]layers[.].*",
                    "multi_modal_projector.linear_1", "lm_head"], ["block:1", "finish:1"]),
]


@pytest.mark.parametrize("family,method,spec", [(f, m, p) for f, m, points in CASES for p in points], ids=str)
def test_killed_run_resumes_to_the_same_bytes(ckpts, family, method, spec, tmp_path, tmp_path_factory):
    quick = TEXT if family == "llama" else VLM
    resumed_equals_reference(tmp_path, tmp_path_factory, [str(ckpts[family]), *method, *quick], spec)


@pytest.mark.parametrize("how,rc", [("INT", 130), ("TERM", 143)])
def test_signal_stops_after_the_block_and_says_how_to_resume(ckpts, how, rc, tmp_path, tmp_path_factory):
    argv = [str(ckpts["llama"]), "--method", "wanda", *TEXT]
    proc = resumed_equals_reference(tmp_path, tmp_path_factory, argv, f"prune:9:{how}", expect_rc=rc)
    # the 9th linear is in block 1 (7 per block): the run finishes block 1 and stops
    assert "stopping after the current block (send it again to stop at once)" in proc.stderr
    assert "stopped after block 2 of 4" in proc.stderr
    assert f"Resume with: python -m atv_sparse.convert {ckpts['llama']} --method wanda" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_sigint_stops_at_once_and_the_staging_still_resumes(ckpts, tmp_path, tmp_path_factory):
    argv = [str(ckpts["llama"]), "--method", "sparsegpt", *TEXT]
    out = tmp_path / "out"
    proc = convert_in_subprocess("prune:16:INT2", [*argv, "--out", str(out)])
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "stopped at once; 2 of 4 blocks are kept in" in proc.stderr
    journal = json.loads((staging_path(out) / JOURNAL_NAME).read_text())
    assert journal["blocks_done"] == 2
    run([*argv, "--out", str(out), "--resume"])
    assert digests(out) == reference(tmp_path_factory, argv)


def test_leftover_staging_is_reported_not_reused(ckpts, tmp_path, capsys):
    argv = [str(ckpts["llama"]), "--method", "wanda", *TEXT, "--out", str(tmp_path / "out")]
    assert convert_in_subprocess("block:1", argv).returncode == -9
    before = {p.name: p.read_bytes() for p in staging_path(tmp_path / "out").iterdir()}
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: {staging_path(tmp_path / 'out')} holds an interrupted conversion to "
                          f"{tmp_path / 'out'} (1 of 4 blocks done); resume it: python -m atv_sparse.convert ")
    assert err.endswith(f"--resume  or remove it: rm -rf {staging_path(tmp_path / 'out')}")
    assert {p.name: p.read_bytes() for p in staging_path(tmp_path / "out").iterdir()} == before


@pytest.fixture(scope="module")
def staged(ckpts, tmp_path_factory, calib_txt):
    """A run killed after block 2, on its own copies of the checkpoint and calibration file."""
    base = tmp_path_factory.mktemp("staged")
    ckpt = Path(shutil.copytree(ckpts["llama"], base / "ckpt"))
    calib = base / "calib.txt"
    calib.write_text(calib_txt.read_text())
    argv = [str(ckpt), "--method", "wanda", *TEXT, "--out", str(base / "out"), "--calib", str(calib)]
    assert convert_in_subprocess("block:2", argv).returncode == -9
    return argv, ckpt, calib, staging_path(base / "out")


@pytest.mark.parametrize("change,words", [
    (["--pattern", "4:8"], "recipe pattern: '2:4' -> '4:8'"),
    (["--nsamples", "2"], "calibration nsamples: 3 -> 2"),
    (["--format", "dense"], "output format: 'packed' -> 'dense'"),
    ("calib", "calibration sha256"),
    ("input", "input model.safetensors"),
])
def test_resume_refuses_a_different_run_and_touches_nothing(staged, change, words, capsys):
    argv, ckpt, calib, stage = staged
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in stage.iterdir()}
    text, weights = calib.read_text(), ckpt / "model.safetensors"
    times = weights.stat().st_atime_ns, weights.stat().st_mtime_ns
    if change == "calib":
        calib.write_text(text[::-1])
    elif change == "input":
        os.utime(weights, ns=(0, 0))
    try:
        assert main([*argv, *(change if isinstance(change, list) else []), "--resume"]) == 2
    finally:
        calib.write_text(text)
        os.utime(weights, ns=times)
    err = capsys.readouterr().err
    assert f"error: resume: the run staged in {stage} differs from this one (" in err and words in err
    assert "nothing was changed" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in stage.iterdir()} == before


def test_resume_without_a_staged_run_starts_over(ckpts, tmp_path, tmp_path_factory):
    argv = [str(ckpts["llama"]), "--method", "magnitude", "--pattern", "4:8", *TEXT]
    run([*argv, "--out", str(tmp_path / "out"), "--resume"])
    assert digests(tmp_path / "out") == reference(tmp_path_factory, argv)


def test_resume_refuses_a_staging_directory_in_use(ckpts, tmp_path, capsys):
    from atv_sparse.formats.staging import lock_staging

    stage = staging_path(tmp_path / "out")
    stage.mkdir()
    fd = lock_staging(stage)
    try:
        assert main([str(ckpts["llama"]), "--method", "magnitude", "--out", str(tmp_path / "out"), "--resume"]) == 2
    finally:
        os.close(fd)
    assert "is being written by another conversion that is still running" in capsys.readouterr().err


def test_an_error_keeps_the_finished_blocks_for_resume(ckpts, tmp_path, tmp_path_factory, monkeypatch, capsys):
    """A failure after the first journal (CUDA out of memory, a bug) keeps the staging directory."""
    from atv_sparse.prune import driver

    argv = [str(ckpts["llama"]), "--method", "wanda", *TEXT]
    calls, prune = [0], driver._prune_linear

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 16:
            raise RuntimeError("CUDA out of memory (simulated)")
        return prune(*args, **kwargs)

    monkeypatch.setattr(driver, "_prune_linear", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        run([*argv, "--out", str(tmp_path / "out")])
    assert "stopped (RuntimeError): 2 of 4 blocks are kept in" in capsys.readouterr().err
    monkeypatch.setattr(driver, "_prune_linear", prune)
    run([*argv, "--out", str(tmp_path / "out"), "--resume"])
    assert digests(tmp_path / "out") == reference(tmp_path_factory, argv)
