"""formats.staging: the output directory every writer of a model directory uses."""

import pytest

from atv_sparse.errors import AtvSparseError, with_flags
from atv_sparse.formats.staging import StagedOutputDir, check_output_dir, copy_aux_files


def test_messages_name_parameters_and_a_cli_its_flags(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(AtvSparseError, match=r"^`out_dir` .* already exists; pass `overwrite` to replace it$") as e:
        check_output_dir(tmp_path / "out", overwrite=False)
    assert with_flags(str(e.value), {"out_dir": "--out", "overwrite": "--overwrite"}) == (
        f"--out {tmp_path / 'out'} already exists; pass --overwrite to replace it")
    with pytest.raises(AtvSparseError, match=r"^`out_dir` .* is the input checkpoint itself"):
        check_output_dir(tmp_path / "out", overwrite=True, source_dir=tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AtvSparseError, match=r"^`out_dir` .* exists and is not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_staged_directory_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AtvSparseError, match=f"writing {out} failed: .*nothing was written"):
        with StagedOutputDir(out, overwrite=False) as stage:
            (stage.tmp / "half").write_text("x")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with StagedOutputDir(out, overwrite=False) as stage:
        (stage.tmp / "a").write_text("1")
        stage.commit()
    with StagedOutputDir(out, overwrite=True) as stage:
        (stage.tmp / "b").write_text("2")
        stage.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["b"]


def test_aux_files_skip_weights_reports_own_and_existing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "checksums.json", "sparsity.json", "prune_report.json", "config.json",
                 "generation_config.json"):
        (src / name).write_text(name)
    (dst / "generation_config.json").write_text("mine")
    copy_aux_files(src, dst, own={"config.json"})
    assert sorted(p.name for p in dst.iterdir()) == ["chat_template.jinja", "generation_config.json", "tokenizer.json"]
    assert (dst / "generation_config.json").read_text() == "mine"
