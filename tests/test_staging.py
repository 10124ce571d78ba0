"""formats.staging: the output directory every writer of a model directory uses."""

import os
import stat

import pytest

from atv_sparse.errors import AtvSparseError, with_flags
from atv_sparse.formats.staging import StagedOutputDir, check_output_dir, copy_aux_files, read_journal, staging_path


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


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
@pytest.mark.parametrize("resumable", [False, True])
def test_finished_directory_gets_the_umask_mode(tmp_path, umask, resumable):
    """Not mkdtemp's 0700: a server running as another user must be able to read the checkpoint."""
    old = os.umask(umask)
    try:
        with StagedOutputDir(tmp_path / "out", overwrite=False, resumable=resumable) as stage:
            (stage.tmp / "a").write_text("1")
            stage.commit()
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_journal_is_replaced_whole(tmp_path, monkeypatch):
    """A crash while the journal is written leaves the previous one readable."""
    with StagedOutputDir(tmp_path / "out", overwrite=False, resumable=True) as stage:
        stage.write_journal({"blocks_done": 1})
        real_fsync = os.fsync

        def crash(fd):
            raise OSError(5, "simulated crash before the rename")

        monkeypatch.setattr(os, "fsync", crash)
        with pytest.raises(OSError):
            stage.write_journal({"blocks_done": 2})
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert read_journal(stage.tmp) == {"blocks_done": 1}
        assert stage.keep
    assert staging_path(tmp_path / "out").is_dir()  # kept: it holds a journal


def test_resumable_stage_without_a_journal_is_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with StagedOutputDir(tmp_path / "out", overwrite=False, resumable=True) as stage:
            (stage.tmp / "spill").write_text("x")
            raise RuntimeError("before the first block")
    assert list(tmp_path.iterdir()) == []
