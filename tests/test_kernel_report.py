"""benchmarks/kernel_report.py: the SASS reading on a fixed listing, the instruction budget and
static bound against hand arithmetic, the default-decode check on made-up rows, and real
ahead-of-time compiles (no GPU needed): the Triton decode kernel for sm_90a (at most 1 load per
kept weight, no spill, 64-bit output offsets) and the sparse tensor-core kernel for sm_80 and
sm_90a (HMMA.SP in its loop, within its instruction targets)."""

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


def test_static_bound_is_the_smaller_of_bytes_and_issue(report):
    """H100 figures by hand: 2:4 at 1 token on the 4096 x 4096 layer."""
    from atv_sparse.ops.traffic import bytes_moved

    h100 = report.GPUS["H100"]
    dense = bytes_moved(4096, 4096, 1, "dense")["total"]
    sparse = bytes_moved(4096, 4096, 1, "cuda", 2, 4)["total"]
    assert report.static_bound(0.5, 2, 4, 1, "cuda", h100, 1.0) == pytest.approx(dense / sparse)  # bytes bound
    # 40 instructions per kept weight at 65%: 128 * 0.65 / 40 kept weights per cycle per SM
    kept_per_s = 128 * 0.65 / 40 * 132 * 1.98e9
    issue_bound = (dense / 3.35e12) / (4096 * 4096 / 2 / kept_per_s)
    assert issue_bound < dense / sparse
    assert report.static_bound(40, 2, 4, 1, "cuda", h100, 0.65) == pytest.approx(issue_bound)
    b = report.budget(400, 64, 1, 2, 4, "cuda")
    assert b["instr_per_kept"] == 6.25 and b["kept_per_cycle"]["1.00"] == pytest.approx(128 / 6.25)
    assert set(b["bound"]) == set(report.GPUS) and report.budget(400, 64, 128, 2, 4, "triton").get("bound") is None


def test_csrc_kernel_names(report):
    k = report.csrc_kernel("void atv::sp24::(anonymous namespace)::sp24_decode_kernel<__nv_bfloat16, 2, true>(x)")
    assert k == {"kernel": "sp24_decode_kernel", "dtype": "bf16", "tile": 2, "tokens": 16, "gated": True,
                 "patterns": ((2, 4),), "layout": "cuda_sp24"}
    k = report.csrc_kernel("void atv::(anonymous namespace)::nm_decode_kernel<__half, 4, false>(atv::NmArgs<__half>)")
    assert k["tokens"] == 4 and k["patterns"] == ((2, 4), (4, 8)) and k["layout"] == "cuda"
    assert report.csrc_kernel("void atv::other_kernel<__half, 1, false>()") is None


def _csrc_row(report, kernel, tile, loop_len, loads16, opcodes=("LDG.E.NA.128.CONSTANT",)):
    t = "__half"
    row = {"function": f"void atv::{kernel}<{t}, {tile}, false>(a)", "arch": "90a", "loop_len": loop_len,
           "loop_weight_loads16": loads16, "loop_opcodes": list(opcodes)}
    row.update(report.csrc_budget(row))
    return row


def test_decode_check_flags_slow_defaults_and_missed_targets(report):
    good = [_csrc_row(report, "nm_decode_kernel", 1, 384, 8),                       # 6 per kept
            _csrc_row(report, "sp24_decode_kernel", 1, 128, 16, ("HMMA.SP.16832.F32",)),
            _csrc_row(report, "sp24_decode_kernel", 2, 128, 8, ("HMMA.SP.16832.F32",))]
    assert report.decode_default_check([], good) == []
    slow = [_csrc_row(report, "nm_decode_kernel", 1, 64 * 40, 8)] + good[1:]      # 40 per kept: issue-bound
    problems = report.decode_default_check([], slow)
    assert any("default decode (cuda)" in p and "below 1.6x" in p for p in problems)
    assert any("instr_per_kept 40.00 above 7.99" in p for p in problems)
    no_mma = good[:2] + [_csrc_row(report, "sp24_decode_kernel", 2, 128, 8, ("HFMA2",))]
    assert any("no HMMA.SP" in p for p in report.decode_default_check([], no_mma))
    assert any(p.startswith("unchecked") for p in report.decode_default_check([], good[:1]))


def test_sparse_tensor_core_kernel_sass(report):
    """nvcc for sm_80 and sm_90a: every sp24 kernel's loop holds HMMA.SP, no spill, and meets the
    targets (<= 2 instructions per kept weight at M = 1, <= 1 per kept weight and token at M = 16)."""
    from atv_sparse.ops.build_cuda import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc not found")
    rows = report.compile_csrc(["80", "90a"], ("sp24_decode.cu",))
    kernels = [r for r in rows if r.get("csrc_kernel")]
    assert len(kernels) == 16 and not any("error" in r for r in rows), rows[:1]
    for r in kernels:
        assert not report.spills(r), r["function"]
        assert any(op.startswith("HMMA.SP") for op in r["loop_opcodes"]), r["function"]
    problems = [p for p in report.csrc_target_problems(kernels) if not p.startswith("unchecked: no compiled nm_")]
    assert problems == []
