"""convert names, in one warning line, the flags the chosen method does not read."""

import pytest

from atv_sparse.convert import run


@pytest.mark.parametrize("method,extra,named", [
    ("magnitude", ["--calib", "CALIB", "--nsamples", "3", "--seqlen", "24"], "--calib, --nsamples, --seqlen"),
    ("magnitude", ["--seed", "1", "--blocksize", "64"], "--seed, --blocksize"),
    ("wanda", ["--nsamples", "3", "--seqlen", "24", "--percdamp", "0.1", "--alpha", "2"], "--alpha, --percdamp"),
    ("sparsegpt", ["--nsamples", "3", "--seqlen", "24", "--blocksize", "64"], None),
])
def test_ignored_flags_are_named_in_one_line(tiny_llama, calib_txt, tmp_path, capsys, method, extra, named):
    extra = [str(calib_txt) if a == "CALIB" else a for a in extra]
    run([str(tiny_llama), "--method", method, "--out", str(tmp_path / "out"), "--quiet", *extra])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "does not use" in line]
    if named is None:
        assert warnings == []
    else:
        assert warnings == [f"warning: --method {method} does not use {named}; they change nothing in this run"]
