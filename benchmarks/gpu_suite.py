"""The one command a lent GPU runs: every measurement this project needs, within a time budget.

    python benchmarks/gpu_suite.py --out benchmarks/results/h100-2026-12-05 --budget-s 480
    python benchmarks/gpu_suite.py --out /tmp/suite --dry-run        # CPU: every part on tiny shapes

Parts, in order; each writes ``DIR/NN-part.md`` and ``.json`` (and its log) as soon as it
finishes, and ``DIR/summary.md`` is rewritten after every part, so a run cut short keeps what it
measured. A part whose estimate does not fit the time left is skipped with a line saying so;
a part that overruns is stopped at the time left.

1. environment: GPU, clocks, driver, Python / torch / triton / transformers / CUDA versions, the
   CUDA library's and cuSPARSELt's status, measured device copy bandwidth.
2. build: csrc for the local architecture when nvcc exists; else whether a library built on a CPU
   machine and carried here (``python -m atv_sparse.ops.build_cuda --archs "80;90a"``) loads.
3. tests: the GPU tests (kernels, cuSPARSELt, CUDA library, dispatch, capture) with
   ATV_SPARSE_REQUIRE_CUDA_LIB=1 (a missing library fails rather than skips) and one Triton config.
4. latency: ``latency.py`` per layer, Llama-3-8B shapes, 2:4 and 4:8 fp16, M = 1, 16, 64, 2048,
   every backend (``cuda_sp24``: the sparse tensor-core kernel, read against its static bound in
   ``benchmarks/results/kernel-report.md``), dense cuBLAS, and PyTorch's
   ``to_sparse_semi_structured`` (``torch24``) as the anchor;
   achieved time against the bytes-moved ideal.
5. e2e: ``latency.py --e2e``: Llama-3-8B-shaped decode (CUDA graph) and prefill, dense vs 2:4.
6. convert: a random-weight LLaVA-NeXT-8B-shaped checkpoint (the text model's shapes, ``--convert-layers``
   decoder layers, a small vision tower) converted on ``--device cuda`` with Wanda, ATV and
   SparseGPT, each timed (the paper's Table 4), per layer and extrapolated to 32 layers.

The Triton kernels run one config (ATV_SPARSE_TRITON_ONE_CONFIG=1) in every part: autotuning
compiles and times every config per shape and token bucket, minutes that a 480 s budget lacks.
Needs only what the GPU image has (Python 3.12, torch 2.11, triton 3.6, transformers 5.17); no
network. ``--dry-run`` goes through every part on the CPU with tiny shapes (Triton's interpreter,
CPU timers); CI runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
GPU_TESTS = ["tests/test_gpu_readiness.py", "tests/test_gpu_sparse.py", "tests/test_cuda_lib.py",
             "tests/test_kernels.py", "tests/test_sparse_linear.py"]
# Caps on the two long parts, so neither eats the budget of the parts after it.
TESTS_CAP_S, LATENCY_CAP_S = 200, 200
LLAVA_NEXT_8B_TEXT = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)


@dataclasses.dataclass
class Part:
    name: str
    estimate_s: float            # on a GPU; a dry run scales it down
    run: Callable[["Suite"], dict]


@dataclasses.dataclass
class Suite:
    out: Path
    dry_run: bool
    budget_s: float
    convert_layers: int = 2
    start: float = dataclasses.field(default_factory=time.monotonic)
    results: list = dataclasses.field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def env(self) -> dict:
        env = dict(os.environ, ATV_SPARSE_TRITON_ONE_CONFIG="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
            env["ATV_SPARSE_REQUIRE_CUDA_LIB"] = "1"
        return env

    def command(self, name: str, cmd: list[str], timeout_s: float | None = None) -> dict:
        """Run ``cmd`` from the repository root, its output to DIR/<name>.log; stopped at the time left."""
        timeout = max(1.0, min(self.left_s(), timeout_s or 1e9))
        log = self.out / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as fh:
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=self.env(), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        tail = log.read_text(errors="replace").splitlines()[-15:]
        return {"cmd": " ".join(cmd), "exit": code, "seconds": round(time.monotonic() - start, 1), "log": log.name,
                "tail": tail}


# --- the parts ------------------------------------------------------------------------------------------------

def part_environment(s: Suite) -> dict:
    import torch
    import transformers
    import triton

    from latency import copy_bandwidth_gbs, environment  # a sibling script: benchmarks/ is sys.path[0]

    from atv_sparse.ops.cuda_lib import cuda_library_status

    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "cuda_library": cuda_library_status() or "usable"}
    info.update(environment(s.device))
    smi = shutil.which("nvidia-smi")
    if smi and not s.dry_run:
        query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
        proc = subprocess.run([smi, f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True)
        info["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
    info["copy_gbs"] = round(copy_bandwidth_gbs(s.device), 1)
    return info


def part_build(s: Suite) -> dict:
    from atv_sparse.ops import build_cuda

    nvcc = build_cuda.find_nvcc()
    if s.dry_run:
        return {"nvcc": nvcc, "built": False, "note": "dry run: nothing compiled; on a GPU this builds csrc for "
                "the local architecture with nvcc, or checks a carried library"}
    if nvcc is None:
        from atv_sparse.ops.cuda_lib import cuda_library_status

        why = cuda_library_status()
        return {"nvcc": None, "built": False, "carried_library": why or "usable",
                "note": "no nvcc here: build on a CPU machine with `python -m atv_sparse.ops.build_cuda --archs "
                        "\"80;90a\"` and carry atv_sparse/libatv_sparse_cuda.so"}
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major >= 9 else "")
    result = s.command("02-build", [sys.executable, "-m", "atv_sparse.ops.build_cuda", "--archs", arch])
    return {"nvcc": nvcc, "arch": arch, **result}


def part_tests(s: Suite) -> dict:
    files = ["tests/test_gpu_readiness.py"] if s.dry_run else GPU_TESTS
    junit = s.out / "03-tests.xml"
    result = s.command("03-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=30",
                                    f"--junitxml={junit}", *files], timeout_s=TESTS_CAP_S)
    if junit.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    return result


def _latency_args(s: Suite, out: Path) -> list[str]:
    if s.dry_run:
        return ["--device", "cpu", "--shapes", "tiny", "--pattern", "2:4", "--m", "1",
                "--backends", "triton,torch24,auto", "--out-dir", str(out)]
    return ["--shapes", "llama3-8b", "--pattern", "2:4,4:8", "--dtype", "fp16", "--m", "1,16,64,2048",
            "--backends", "cuda,cuda_sp24,triton,cusparselt,torch24,auto", "--out-dir", str(out)]


def part_latency(s: Suite) -> dict:
    out = s.out / "latency"
    result = s.command("04-latency", [sys.executable, str(BENCH / "latency.py"), *_latency_args(s, out)],
                       timeout_s=LATENCY_CAP_S)
    result["files"] = sorted(p.name for p in out.glob("*")) if out.exists() else []
    return result


def part_e2e(s: Suite) -> dict:
    out = s.out / "e2e"
    args = ["--e2e", "--skip-layers", "--pattern", "2:4", "--out-dir", str(out)]
    if s.dry_run:
        args += ["--device", "cpu", "--e2e-shape", "tiny", "--e2e-tokens", "2", "--e2e-prefill", "4",
                 "--backends", "triton"]
    else:
        args += ["--dtype", "fp16", "--e2e-tokens", "128", "--e2e-prefill", "2048"]
    result = s.command("05-e2e", [sys.executable, str(BENCH / "latency.py"), *args])
    result["files"] = sorted(p.name for p in out.glob("*")) if out.exists() else []
    return result


def write_llava_next(path: Path, tiny: bool, layers: int) -> Path:
    """A random-weight LLaVA-NeXT checkpoint: the tests' tiny one, or with LLaVA-NeXT-8B's text shapes
    (``layers`` decoder layers; the vision tower stays small: conversion prunes the text model)."""
    import torch

    from atv_sparse.tinybench.families import write_tiny_vlm

    text_dims = None if tiny else dict(LLAVA_NEXT_8B_TEXT, num_hidden_layers=layers)
    return write_tiny_vlm(path, "llava_next", dtype=torch.float32 if tiny else torch.bfloat16, text_dims=text_dims)


def part_convert(s: Suite) -> dict:
    work = s.out / "convert-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        start = time.monotonic()
        ckpt = write_llava_next(work / "llava-next", s.dry_run, s.convert_layers)
        result = {"checkpoint_s": round(time.monotonic() - start, 1), "layers": s.convert_layers if not s.dry_run else 2,
                  "methods": {}}
        nsamples = "2" if s.dry_run else "16"
        for method in ("wanda", "atv", "sparsegpt"):
            run = s.command(f"06-convert-{method}", [
                sys.executable, "-m", "atv_sparse.convert", str(ckpt), "--method", method, "--pattern", "2:4",
                "--nsamples", nsamples, "--device", s.device, "--out", str(work / method), "--quiet"])
            layers = result["layers"]
            run["seconds_per_layer"] = round(run["seconds"] / layers, 2)
            run["extrapolated_32_layers_s"] = round(run["seconds"] / layers * 32, 1)
            result["methods"][method] = run
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)  # an 8B-shaped checkpoint is GBs of disk


PARTS = [Part("environment", 30, part_environment), Part("build", 60, part_build), Part("tests", 150, part_tests),
         Part("latency", 150, part_latency), Part("e2e", 90, part_e2e), Part("convert", 120, part_convert)]
DRY_RUN_SCALE = 0.5  # estimates are GPU seconds; a dry run's tiny shapes take about as long on a CPU


# --- running and writing ----------------------------------------------------------------------------------------

def _markdown(name: str, record: dict) -> str:
    lines = [f"# {name}", "", f"status: {record['status']}", ""]
    for key, value in record.get("result", {}).items():
        if isinstance(value, list):
            lines += [f"- {key}:", "", "```", *map(str, value), "```", ""]
        elif isinstance(value, dict):
            lines += [f"- {key}:", "", "```", json.dumps(value, indent=1, default=str), "```", ""]
        else:
            lines.append(f"- {key}: {value}")
    if record.get("error"):
        lines += ["", "```", record["error"], "```"]
    return "\n".join(lines) + "\n"


def _failed(result: dict) -> bool:
    codes = [result.get("exit")] + [m.get("exit") for m in result.get("methods", {}).values()]
    return any(c not in (None, 0) for c in codes) or bool(result.get("failures") or result.get("errors"))


def write_summary(s: Suite) -> None:
    lines = [f"# GPU suite {'(dry run) ' if s.dry_run else ''}{datetime.date.today().isoformat()}", "",
             f"budget {s.budget_s:.0f} s, used {time.monotonic() - s.start:.0f} s", "",
             "| # | part | status | seconds | files |", "|---:|---|---|---:|---|"]
    for i, r in enumerate(s.results, 1):
        lines.append(f"| {i} | {r['part']} | {r['status']} | {r.get('seconds', 0):.0f} | {r.get('files', '')} |")
    (s.out / "summary.md").write_text("\n".join(lines) + "\n")
    (s.out / "summary.json").write_text(json.dumps(s.results, indent=1, default=str) + "\n")


def run_suite(s: Suite, parts: list[Part]) -> int:
    """Run ``parts`` in order within the budget; returns the number of failed parts."""
    s.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for i, part in enumerate(parts, 1):
        stem = f"{i:02d}-{part.name}"
        estimate = part.estimate_s * (DRY_RUN_SCALE if s.dry_run else 1)
        record = {"part": part.name, "files": f"{stem}.md, {stem}.json"}
        if estimate > s.left_s():
            record["status"] = (f"skipped: needs about {estimate:.0f} s, {max(s.left_s(), 0):.0f} s of the "
                                f"{s.budget_s:.0f} s budget left")
            print(f"gpu_suite: {part.name} {record['status']}", flush=True)
        else:
            print(f"gpu_suite: ({i}/{len(parts)}) {part.name} ...", flush=True)
            start = time.monotonic()
            try:
                record["result"] = part.run(s)
                record["status"] = "failed" if _failed(record["result"]) else "ok"
            except Exception as exc:  # one broken part must not cost the others their turn
                import traceback

                record["status"], record["error"] = "failed", traceback.format_exc()[-3000:]
                print(f"gpu_suite: {part.name} raised {type(exc).__name__}: {exc}", flush=True)
            record["seconds"] = time.monotonic() - start
            print(f"gpu_suite: {part.name} {record['status']} in {record['seconds']:.0f} s", flush=True)
        failed += record["status"] == "failed"
        (s.out / f"{stem}.md").write_text(_markdown(part.name, record))
        (s.out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        s.results.append(record)
        write_summary(s)
    return failed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for every part's Markdown + JSON")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all parts (default 480)")
    p.add_argument("--dry-run", action="store_true", help="CPU: every part on tiny shapes (Triton interpreter)")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(p.name for p in PARTS)}")
    p.add_argument("--convert-layers", type=int, default=2, help="decoder layers of the 8B-shaped checkpoint")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA GPU here; use --dry-run to go through every part on the CPU", file=sys.stderr)
            return 2
    parts = PARTS
    if args.parts:
        wanted = [p.strip() for p in args.parts.split(",")]
        unknown = sorted(set(wanted) - {p.name for p in PARTS})
        if unknown:
            print(f"gpu_suite: unknown parts {unknown}; known: {', '.join(p.name for p in PARTS)}", file=sys.stderr)
            return 2
        parts = [p for p in PARTS if p.name in wanted]
    suite = Suite(Path(args.out), args.dry_run, args.budget_s, args.convert_layers)
    failed = run_suite(suite, parts)
    print(f"gpu_suite: {len(parts) - failed} of {len(parts)} parts ok or skipped; results in {suite.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
