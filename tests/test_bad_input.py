"""Every bad input: a one-line error naming the thing, exit code 2, and the file system untouched."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import atv_sparse
from atv_sparse.convert import main
from atv_sparse.errors import AtvSparseError

from conftest import write_tiny_model

QUICK = ["--nsamples", "2", "--seqlen", "16", "--quiet"]


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def fails(capsys, argv, *needles, root=None):
    """Run convert; assert exit 2, one error line containing every needle, and ``root`` unchanged."""
    before = snapshot(root) if root else None
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "error" in err[0], err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    if root:
        assert snapshot(root) == before
    return err[0]


@pytest.fixture
def work(tmp_path, tiny_llama):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    return tmp_path, ckpt


def test_missing_checkpoint(capsys, tmp_path):
    fails(capsys, [tmp_path / "nope", "--out", tmp_path / "o"], "nope", "no such checkpoint", root=tmp_path)


def test_not_a_model_directory(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    fails(capsys, [tmp_path / "empty", "--out", tmp_path / "o"], "no config.json", root=tmp_path)
    (tmp_path / "file.txt").write_text("x")
    fails(capsys, [tmp_path / "file.txt", "--out", tmp_path / "o"], "not a directory", root=tmp_path)


def test_unsupported_architecture(capsys, work):
    root, ckpt = work
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    fails(capsys, [ckpt, "--out", root / "o"], "GPT2LMHeadModel", "LlamaForCausalLM, Qwen2ForCausalLM", root=root)


def test_truncated_safetensors(capsys, work):
    root, ckpt = work
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    fails(capsys, [ckpt, "--out", root / "o"], "model.safetensors", "truncated", root=root)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    fails(capsys, [ckpt, "--out", root / "o"], "model.safetensors", "header", root=root)


def test_incompatible_layer(capsys, tmp_path):
    ckpt = write_tiny_model(tmp_path / "odd", "llama", intermediate_size=100)  # down_proj in=100
    msg = fails(capsys, [ckpt, "--pattern", "4:8", "--out", tmp_path / "o"], "model.layers.0.mlp.down_proj",
                "in_features=100", root=tmp_path)
    assert "--skip-incompatible" in msg
    assert main([str(ckpt), "--pattern", "4:8", "--out", str(tmp_path / "o"), "--skip-incompatible", *QUICK]) == 0
    sparsity = json.loads((tmp_path / "o" / "sparsity.json").read_text())["modules"]
    assert sparsity["model.layers.1.mlp.down_proj"]["pattern_check"].startswith("skipped")
    keys = load_file(tmp_path / "o" / "model.safetensors").keys()
    assert "model.layers.1.mlp.down_proj.weight" in keys and "model.layers.1.mlp.up_proj.weight_values" in keys
    model = atv_sparse.load(tmp_path / "o")
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)


@pytest.mark.parametrize("argv,needle", [
    (["--pattern", "unstructured", "--sparsity", "0"], "sparsity 0.0 is outside (0, 1)"),
    (["--pattern", "unstructured", "--sparsity", "1"], "outside (0, 1)"),
    (["--pattern", "unstructured", "--sparsity", "-0.2"], "outside (0, 1)"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "0:4"], "0 < N < M"),
    (["--pattern", "two:four"], "not N:M"),
    (["--pattern", "2:4:8"], "not N:M"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "contradicts"),
    (["--nsamples", "0"], "--nsamples"),
    (["--seqlen", "0"], "--seqlen"),
    (["--max-shard-size", "lots"], "size 'lots'"),
    (["--ignore", "re:("], "not a valid regular expression"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--device", "warp-drive"], "not a torch device"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_arguments(capsys, work, argv, needle):
    root, ckpt = work
    fails(capsys, [ckpt, "--out", root / "o", *argv], needle, root=root)


def test_argparse_errors_are_one_line(capsys, work):
    root, ckpt = work
    fails(capsys, [ckpt, "--out", root / "o", "--method", "nope"], "--method", root=root)
    fails(capsys, [ckpt, "--out", root / "o", "--nsamples", "x"], "--nsamples", root=root)


def test_calibration_file_problems(capsys, work):
    root, ckpt = work
    (root / "empty.txt").write_text("  \n")
    fails(capsys, [ckpt, "--out", root / "o", "--calib", root / "empty.txt"], "empty.txt", "empty", root=root)
    (root / "short.txt").write_text("only a few words here")
    fails(capsys, [ckpt, "--out", root / "o", "--calib", root / "short.txt", "--seqlen", "64"],
          "short.txt", "shorter than one window", root=root)
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"nope": 1}\n')
    fails(capsys, [ckpt, "--out", root / "o", "--calib", root / "bad.jsonl"], "bad.jsonl, line 2", root=root)
    fails(capsys, [ckpt, "--out", root / "o", "--calib", root / "missing.txt"], "missing.txt", root=root)


def test_jsonl_calibration_works(work):
    root, ckpt = work
    lines = [json.dumps({"text": f"Sentence number {i} talks about the weather and the sea."}) for i in range(40)]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    assert main([str(ckpt), "--out", str(root / "o"), "--calib", str(root / "c.jsonl"), *QUICK]) == 0


def test_existing_output_needs_overwrite(capsys, work):
    root, ckpt = work
    (root / "o").mkdir()
    (root / "o" / "keep.txt").write_text("precious")
    fails(capsys, [ckpt, "--out", root / "o"], "already exists", "--overwrite", root=root)
    assert main([str(ckpt), "--out", str(root / "o"), "--overwrite", *QUICK]) == 0
    assert not (root / "o" / "keep.txt").exists() and (root / "o" / "model.safetensors").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_out_is_input(capsys, work):
    root, ckpt = work
    fails(capsys, [ckpt, "--out", ckpt, "--overwrite"], "is the input checkpoint", root=root)


def test_write_failure_leaves_nothing(capsys, work, monkeypatch):
    root, ckpt = work
    import atv_sparse.formats.checkpoint as ckpt_mod

    calls = []
    save_shard = ckpt_mod._save_shard

    def failing_save(entries, spill, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return save_shard(entries, spill, path)

    monkeypatch.setattr(ckpt_mod, "_save_shard", failing_save)
    fails(capsys, [ckpt, "--out", root / "o", "--max-shard-size", "40KB", *QUICK], "No space left", root=root)
    assert len(calls) == 3


def test_interrupted_write_leaves_no_checkpoint_only_a_resumable_stage(work, monkeypatch):
    """Ctrl-C during the final writes: no --out, only the hidden staging directory with its journal
    (every block done), which --resume finishes (issue 33)."""
    root, ckpt = work
    import atv_sparse.formats.checkpoint as ckpt_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    argv = [str(ckpt), "--out", str(root / "o"), *QUICK]
    with monkeypatch.context() as m:
        m.setattr(ckpt_mod, "copy_aux_files", interrupted)
        before = {name for name, _ in snapshot(root)}
        assert main(argv) == 130
    added = {name for name, _ in snapshot(root)} - before
    assert not (root / "o").exists()
    assert added and all(name.startswith(".o.partial") for name in added) and ".o.partial/.journal.json" in added
    assert main([*argv, "--resume"]) == 0
    assert (root / "o" / "model.safetensors").is_file() and not (root / ".o.partial").exists()


def test_nan_in_calibration_statistics(capsys, tmp_path):
    ckpt = write_tiny_model(tmp_path / "nan", "llama")
    state = load_file(ckpt / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, :] = float("inf")
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    fails(capsys, [ckpt, "--out", tmp_path / "o", *QUICK], "model.layers.1.mlp.down_proj", "NaN or Inf",
          root=tmp_path)


def test_already_compressed_input(capsys, work):
    root, ckpt = work
    assert main([str(ckpt), "--out", str(root / "o"), *QUICK]) == 0
    fails(capsys, [root / "o", "--out", root / "o2"], "already a compressed checkpoint", root=root)


@pytest.fixture(scope="module")
def packed_dirs(tmp_path_factory, tiny_llama):
    base = tmp_path_factory.mktemp("packed")
    for pattern in ("2:4", "unstructured"):
        assert main([str(tiny_llama), "--out", str(base / pattern.replace(":", "-")), "--pattern", pattern,
                     "--method", "magnitude", "--quiet"]) == 0
    return base


def corrupt(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("kind", ["2-4", "unstructured"])
def test_loader_refuses_flipped_bit(packed_dirs, tmp_path, kind):
    name = "model.layers.1.self_attn.o_proj.weight_bitmask"

    def flip(state):
        state[name][5, 2] ^= 0x04

    bad = corrupt(packed_dirs / kind, tmp_path / "bad", flip)
    with pytest.raises(AtvSparseError, match="model.layers.1.self_attn.o_proj.weight_"):
        atv_sparse.load(bad)
    from transformers import AutoModelForCausalLM
    with pytest.raises(AtvSparseError, match="model.layers.1.self_attn.o_proj.weight_"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("kind", ["2-4", "unstructured"])
def test_loader_refuses_truncated_values(packed_dirs, tmp_path, kind):
    name = "model.layers.0.mlp.gate_proj.weight_values"

    def truncate(state):
        v = state[name]
        state[name] = v[:, :-1].contiguous() if v.dim() == 2 else v[:-1].clone()

    bad = corrupt(packed_dirs / kind, tmp_path / "bad", truncate)
    with pytest.raises(AtvSparseError, match=name):
        atv_sparse.load(bad)


def test_loader_refuses_missing_values_and_truncated_file(packed_dirs, tmp_path):
    name = "model.layers.0.mlp.gate_proj.weight_values"
    bad = corrupt(packed_dirs / "2-4", tmp_path / "bad", lambda state: state.pop(name))
    with pytest.raises(AtvSparseError, match=f"{name}: missing"):
        atv_sparse.load(bad)
    cut = tmp_path / "cut"
    shutil.copytree(packed_dirs / "2-4", cut)
    path = cut / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(AtvSparseError, match="model.safetensors.*truncated"):
        atv_sparse.load(cut)


def test_loader_refuses_unknown_format_version(packed_dirs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packed_dirs / "2-4", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AtvSparseError, match="format version 99"):
        atv_sparse.load(bad)


def test_no_stray_files_after_failures(tmp_path):
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert os.listdir(tmp_path) == []
