"""benchmarks/gpu_suite.py: the dry run writes every part's files; the budget skips what does not
fit; the bytes-moved model behind latency.py's ideal."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from atv_sparse.ops.traffic import bytes_moved, ideal_ms

REPO = Path(__file__).resolve().parent.parent


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out),
                           "--budget-s", "3600"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = load_suite()
    for i, part in enumerate(suite.PARTS, 1):
        record = json.loads((out / f"{i:02d}-{part.name}.json").read_text())
        assert record["status"] == "ok", (part.name, record)
        assert (out / f"{i:02d}-{part.name}.md").read_text().startswith(f"# {part.name}")
    assert list((out / "latency").glob("*.md")) and list((out / "e2e").glob("*.json"))
    env = json.loads((out / "01-environment.json").read_text())["result"]
    assert env["copy_gbs"] > 0 and env["triton"]
    convert = json.loads((out / "06-convert.json").read_text())["result"]["methods"]
    assert set(convert) == {"wanda", "atv", "sparsegpt"} and all(m["exit"] == 0 for m in convert.values())
    assert "| 6 | convert | ok |" in (out / "summary.md").read_text()
    assert not (out / "convert-work").exists()  # the checkpoint is removed after the part


def test_budget_skips_what_does_not_fit(tmp_path):
    suite = load_suite()
    ran = []
    parts = [suite.Part("fits", 1, lambda s: ran.append("fits") or {"exit": 0}),
             suite.Part("too-long", 10_000, lambda s: ran.append("too-long") or {}),
             suite.Part("broken", 1, lambda s: 1 / 0)]
    s = suite.Suite(tmp_path, dry_run=False, budget_s=100)
    assert suite.run_suite(s, parts) == 1  # the broken part; the others ok or skipped
    assert ran == ["fits"]
    skipped = json.loads((tmp_path / "02-too-long.json").read_text())
    assert skipped["status"].startswith("skipped: needs about 10000 s")
    broken = json.loads((tmp_path / "03-broken.json").read_text())
    assert broken["status"] == "failed" and "ZeroDivisionError" in broken["error"]
    assert "skipped" in (tmp_path / "summary.md").read_text()


def test_bytes_moved_worked_example():
    """Llama-3-8B o_proj, 2:4 fp16, one token: the module docstring's numbers."""
    sparse = bytes_moved(4096, 4096, 1, "triton", 2, 4)
    dense = bytes_moved(4096, 4096, 1, "dense")
    assert sparse["weight"] == 16 * 2**20 and sparse["metadata"] == 2 * 2**20
    assert sparse["activations"] == sparse["output"] == 4096 * 2
    assert dense["weight"] / (sparse["weight"] + sparse["metadata"]) == pytest.approx(1.78, abs=0.005)
    assert ideal_ms(sparse["weight"] + sparse["metadata"], 3000) == pytest.approx(0.00629, abs=1e-5)
    cslt = bytes_moved(4096, 4096, 1, "cusparselt", 2, 4)
    assert cslt["metadata"] == 4096 * 4096 // 2 // 4  # 2 bits per kept value
    gated = bytes_moved(2 * 14336, 4096, 16, "cuda", 4, 8, gated=True)
    assert gated["output"] == 16 * 14336 * 2
    ref = bytes_moved(64, 64, 1, "reference", 2, 4)
    assert ref["weight"] == 64 * 32 * 2 + 2 * 64 * 64 * 2
    with pytest.raises(ValueError, match="needs the N:M pattern"):
        bytes_moved(64, 64, 1, "triton")
    with pytest.raises(ValueError, match="not one of"):
        bytes_moved(64, 64, 1, "auto", 2, 4)
