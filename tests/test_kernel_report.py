"""benchmarks/kernel_report.py: the SASS reading on a fixed listing, and one real ahead-of-time
compile of the decode kernel for sm_90a (no GPU needed): at most 1 load per kept weight, no
spill, 64-bit output offsets."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("kernel_report", REPO / "benchmarks" / "kernel_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_report"] = module  # worker processes unpickle its Spec class by name
    spec.loader.exec_module(module)
    return module


SASS = """
        Function : _k
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 LDG.E.U8 R2, desc[UR4][R8.64] ;
.L_x_1:
        /*0020*/               @P0 LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0030*/                   LDS.U16 R5, [R0] ;
        /*0040*/                   LDG.E.U16 R6, desc[UR4][R10.64] ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;
        /*0060*/                   STG.E.U16 desc[UR4][R2.64], R5 ;
        /*0070*/                   BRA 0x70;
"""


def test_inner_loop_load_mix_from_sass(report):
    functions = report.parse_sass(SASS)
    body = report.inner_loop(functions["_k"])
    assert [addr for addr, _, _ in body] == [0x20, 0x30, 0x40, 0x50]
    assert report.load_mix(body) == {"LDG.E.128": 1, "LDG.E.U16": 1, "LDS.U16": 1}  # LDC is a constant, not a load


def test_decode_kernels_compile_for_sm90_within_one_load_per_kept_weight(report, tmp_path):
    """In a process of its own: the interpreter (TRITON_INTERPRET=1, set for the tests) replaces
    @triton.jit functions with ones that cannot be compiled."""
    import json
    import os
    import subprocess

    from atv_sparse.kernels import nm_gemv

    keys = []
    for m in (4, 8):
        c = nm_gemv.default_config(1, False, m)
        keys.append(f"gemv {m // 2}:{m} fp16 bias M1 \\[BLOCK_N={c.kwargs['BLOCK_N']},BLOCK_V={c.kwargs['BLOCK_V']},"
                    f"w{c.num_warps},")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_report.py"), "--arch", "90a", "--no-csrc",
                           "--jobs", "1", "--only", "|".join(keys), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["triton"]
    assert len(rows) == 2
    for row in rows:
        assert not report.spills(row), row
        assert row["loads_per_kept"] <= 1.0, row["loop_loads"]
        assert row["i64_store_offsets"]  # out offsets tok * stride_om in 64 bits (M x N >= 2^31)
    assert proc.stdout.strip().splitlines()[-1].startswith("kernel_report: 2 Triton kernels compiled, 0 compile errors")
