"""Static report of every kernel the dispatcher can launch, compiled ahead of time on the CPU.

    python benchmarks/kernel_report.py                       # every specialisation, sm_80 and sm_90a
    python benchmarks/kernel_report.py --ci                  # the CI subset (a few minutes on 2 cores)
    python benchmarks/kernel_report.py --baseline-rev ff286b2  # "before" figures from another revision

No GPU is needed. Each Triton kernel specialisation is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``
with the specialisations a real launch gets: 16-byte-aligned pointers and sizes / strides
divisible by 16 marked ``tt.divisibility = 16``, integers equal to 1 (M at decode, unit strides)
made constants, as Triton's launcher does. The csrc kernels go through nvcc (``-cubin``).
Triton's own ``cuobjdump`` (``triton/backends/nvidia/bin``) then gives, per kernel:

- registers, stack (spills), local and shared memory (``cuobjdump -res-usage``);
- the load instructions of the inner loop (the backward branch with the most global loads) with
  their widths, global and shared (``cuobjdump -sass``), and their number per kept weight: loads
  per thread per iteration / kept weights a thread handles per iteration.

What is compiled: for each kernel family (the skinny decode kernel ``nm_gemv``, the tile GEMM
``nm_gemm``), pattern, dtype, variant (plain, bias, gated), token tile (``BLOCK_M``, from the
dispatcher's token buckets) and every autotune config the kernel may pick for it (after its
``early_config_prune``), for every architecture. Layer shape: Llama-3-8B's 4096 x 4096.

Writes Markdown (``--out``, default benchmarks/results/kernel-report.md) and JSON beside it. The
last line sums it up; the exit status is 1 on a compile error or a spill in a config autotune may
pick (a spill in the decode kernel is a silent slowdown a CPU machine can catch).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kernel-report.md"
ARCHS = {"80": 80, "90a": 90}  # Triton picks sm_90a itself for capability 90
DEFAULT_PATTERNS = ((2, 4), (4, 8))  # the acceptance patterns; --all-patterns adds 1:4, 3:4, 1:8 ... 7:8
DTYPES = ("fp16", "bf16")
BLOCK_MS = (1, 2, 4, 8, 16)  # gemv's BLOCK_M = min(16, next_pow2(M)) over the buckets up to 64 tokens
GEMM_M = 128  # a bucket the GEMM serves (> 64 tokens)
SHAPE_N, SHAPE_K = 4096, 4096
LOAD_OPS = ("LDG", "LDS", "LDSM", "LDGSTS", "LDL", "LD", "UTMALDG")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One Triton kernel specialisation: what a launch with these arguments compiles."""
    family: str      # "gemv" or "gemm"
    n: int
    m: int
    dtype: str       # "fp16" / "bf16"
    variant: str     # "plain", "bias", "gated"
    block_m: int     # gemv: BLOCK_M constexpr; gemm: the token count of the launch
    config: tuple    # sorted (name, value) of the autotune config's kwargs
    warps: int
    stages: int
    arch: str
    default: bool    # the kernel's DEFAULT_CONFIG (what tests and the interpreter launch)

    @property
    def key(self) -> str:
        cfg = ",".join(f"{k}={v}" for k, v in self.config)
        return (f"{self.family} {self.n}:{self.m} {self.dtype} {self.variant} M{self.block_m} [{cfg},w{self.warps},"
                f"s{self.stages}] sm_{self.arch}")


# --- the kernels ---------------------------------------------------------------------------------------

def kernel_modules(root: Path | None = None) -> dict:
    """{"gemv": module, "gemm": module}: this checkout's kernels, or those of a kernels/ folder ``root``
    (another revision's, for the before / after columns) imported as a package of its own."""
    if root is None:
        from atv_sparse.kernels import nm_gemm, nm_gemv

        return {"gemv": nm_gemv, "gemm": nm_gemm}
    name = "atv_kernels_baseline"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return {"gemv": importlib.import_module(f"{name}.nm_gemv"), "gemm": importlib.import_module(f"{name}.nm_gemm")}


def family_kernel(module, family: str):
    return getattr(module, "_nm_gemv_kernel" if family == "gemv" else "_nm_gemm_kernel")


def pickable_configs(module, family: str, block_m: int, gated: bool, group: int) -> list:
    """The configs autotune may pick for this launch (after the kernel's early_config_prune)."""
    kernel = family_kernel(module, family)
    configs = list(kernel.configs)
    prune = getattr(module, "_prune", None) if family == "gemv" else None
    if prune is not None:
        configs = prune(configs, {"BLOCK_M": block_m}, BLOCK_M=block_m, GATED=gated, GROUP=group)
    return configs


def default_config(module, block_m: int, gated: bool, group: int):
    """The config one-config runs (tests, the interpreter) launch, if the module names one."""
    if hasattr(module, "default_config"):
        return module.default_config(block_m, gated, group)
    return getattr(module, "DEFAULT_CONFIG", None)


def _cfg_tuple(config) -> tuple:
    return tuple(sorted(config.kwargs.items()))


def enumerate_specs(modules: dict, archs: list[str], patterns, ci: bool) -> list[Spec]:
    """Every specialisation (or the CI subset: every config for 2:4 fp16 at the extreme token tiles
    and for the GEMM, the default config for the rest)."""
    specs = []
    for arch in archs:
        for family in ("gemv", "gemm"):
            module = modules[family]
            for n, m in patterns:
                for dtype in DTYPES:
                    variants = ("plain", "bias", "gated") if family == "gemv" else ("plain", "bias")
                    for variant in variants:
                        for block_m in (BLOCK_MS if family == "gemv" else (GEMM_M,)):
                            configs = pickable_configs(module, family, block_m, variant == "gated", m)
                            default = default_config(module, block_m, variant == "gated", m)
                            if ci and block_m not in (1, 4, 16, GEMM_M):
                                continue
                            sweep = (not ci or (family == "gemm" and (n, m) == (2, 4) and variant == "plain")
                                     or ((n, m) == (2, 4) and dtype == "fp16" and variant == "plain"
                                         and block_m in (1, 16) and arch == archs[-1]))
                            if not sweep:
                                same = [c for c in configs if default is not None
                                        and _cfg_tuple(c) == _cfg_tuple(default) and c.num_warps == default.num_warps]
                                configs = same or configs[:1]
                            for c in configs:
                                is_default = default is not None and _cfg_tuple(c) == _cfg_tuple(default) \
                                    and c.num_warps == default.num_warps
                                specs.append(Spec(family, n, m, dtype, variant, block_m, _cfg_tuple(c), c.num_warps,
                                                  c.num_stages, arch, is_default))
    return specs


def launch_values(spec: Spec) -> dict:
    """The runtime arguments of a launch of ``spec`` on the report's layer shape."""
    k, n_out = SHAPE_K, SHAPE_N
    kv = k * spec.n // spec.m
    tokens = spec.block_m
    return {"M": tokens, "N": n_out, "K": k, "KV": kv, "M_BUCKET": tokens, "stride_xm": k, "stride_xk": 1,
            "stride_vn": kv, "stride_bn": k // 8, "stride_om": n_out, "stride_on": 1}


def constexpr_values(spec: Spec) -> dict:
    return {"GATED": spec.variant == "gated", "HAS_BIAS": spec.variant == "bias", "OUT_BF16": spec.dtype == "bf16",
            "NKEEP": spec.n, "GROUP": spec.m, "POS_BITS": spec.m.bit_length() - 1, "BLOCK_M": spec.block_m,
            "DOT_FP32": False, **dict(spec.config)}


POINTER_TYPES = {"mask_ptr": "*u8", "up_mask_ptr": "*u8", "lut_ptr": "*i32"}


def build_source(fn, spec: Spec):
    """(signature, constexprs, attrs) as Triton's launcher specialises a launch of ``spec``."""
    values, consts = launch_values(spec), constexpr_values(spec)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            if name not in consts:
                raise KeyError(f"kernel_report: no value for constexpr {name} of {fn.__name__}")
            signature[name], constexprs[name] = "constexpr", consts[name]
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, "*" + spec.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        else:
            if name not in values:
                raise KeyError(f"kernel_report: no launch value for argument {name} of {fn.__name__}")
            value = values[name]
            if value == 1:  # Triton's launcher turns integer 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def kept_per_thread(spec: Spec) -> float:
    """Kept weights one thread handles per inner-loop iteration (both weights when gated)."""
    cfg = dict(spec.config)
    threads = 32 * spec.warps
    if spec.family == "gemv":
        return cfg["BLOCK_N"] * cfg["BLOCK_V"] * (2 if spec.variant == "gated" else 1) / threads
    return cfg["BLOCK_N"] * cfg["BLOCK_K"] * spec.n / spec.m / threads


# --- reading a cubin --------------------------------------------------------------------------------------

def tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"kernel_report: {path} missing (Triton's bundled CUDA tools)")
    return str(path)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """{function: [(address, opcode, operands)]} from ``cuobjdump -sass``."""
    functions, current, pending_labels, labels = {}, None, [], {}
    for line in text.splitlines():
        fn = re.search(r"Function : (\S+)", line)
        if fn:
            current = fn.group(1)
            functions[current] = []
            labels[current] = {}
            continue
        label = _LABEL.match(line)
        if label:
            pending_labels.append(label.group(1))
            continue
        match = _SASS_LINE.search(line)
        if match and current is not None:
            addr = int(match.group(1), 16)
            for lab in pending_labels:
                labels[current][lab] = addr
            pending_labels = []
            functions[current].append((addr, match.group(2), match.group(3)))
    for name, instrs in functions.items():  # branch targets written as labels -> addresses
        functions[name] = [(a, op, re.sub(r"`?\(?(\.L_x_\d+)\)?", lambda m, n=name: hex(labels[n].get(m.group(1), 0)),
                                           ops)) for a, op, ops in instrs]
    return functions


def is_load(opcode: str) -> bool:
    head = opcode.split(".")[0]
    return head in LOAD_OPS


def inner_loop(instrs: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Instructions of the loop whose body holds the most global loads (ties: the shortest)."""
    loops = []
    for addr, op, operands in instrs:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < addr:
                start = int(target.group(1), 16)
                body = [i for i in instrs if start <= i[0] <= addr]
                global_loads = sum(1 for _, o, _ in body if o.startswith(("LDG", "LDGSTS", "UTMALDG")))
                loops.append((global_loads, -len(body), body))
    if not loops:
        return []
    return max(loops, key=lambda t: (t[0], t[1]))[2]


def load_mix(body) -> dict[str, int]:
    """{opcode with width: count} of the loads in ``body`` (predication dropped)."""
    mix: dict[str, int] = {}
    for _, op, _ in body:
        if is_load(op):
            mix[op] = mix.get(op, 0) + 1
    return dict(sorted(mix.items()))


def res_usage(cubin: Path) -> dict[str, dict[str, int]]:
    out = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage, current = {}, None
    for line in out.splitlines():
        fn = re.search(r"Function (\S+):", line)
        if fn:
            current = fn.group(1)
            continue
        if current and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return usage


def analyse_cubin(cubin: Path) -> dict[str, dict]:
    """Per function: registers, stack, local, shared, the inner loop's load mix and its spill loads."""
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = res_usage(cubin)
    result = {}
    for name, instrs in parse_sass(sass).items():
        body = inner_loop(instrs)
        u = usage.get(name, {})
        result[name] = {"regs": u.get("REG"), "stack": u.get("STACK", 0), "local": u.get("LOCAL", 0),
                        "shared": u.get("SHARED", 0), "loop_loads": load_mix(body), "loop_len": len(body),
                        "local_ops": sum(1 for _, op, _ in instrs if op.startswith(("LDL", "STL")))}
    return result


# --- compiling ---------------------------------------------------------------------------------------------

_MODULES: dict = {}


def _compile_one(args) -> dict:
    """Compile one spec (in a worker process) and analyse its cubin."""
    spec, baseline_root = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key = str(baseline_root)
    if key not in _MODULES:
        _MODULES[key] = kernel_modules(Path(baseline_root) if baseline_root else None)
    fn = family_kernel(_MODULES[key][spec.family], spec.family).fn
    row = {"key": spec.key, **dataclasses.asdict(spec), "config": dict(spec.config)}
    start = time.perf_counter()
    try:
        signature, constexprs, attrs = build_source(fn, spec)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", ARCHS[spec.arch], 32),
                                  options={"num_warps": spec.warps, "num_stages": spec.stages})
    except Exception as exc:  # reported, and the exit status says so
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return row
    row["compile_s"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        info = next(iter(analyse_cubin(cubin).values()))
    row.update(info)
    row["i64_store_offsets"] = bool(re.search(r"arith\.extsi .* to tensor<\d+xi64", compiled.asm["ttir"]))
    kept = kept_per_thread(spec)
    loads = sum(info["loop_loads"].values())
    row["kept_per_thread"] = kept
    row["loads_per_kept"] = loads / kept if kept else None
    return row


def compile_all(specs: list[Spec], jobs: int, baseline_root: Path | None = None, progress: bool = True) -> list[dict]:
    rows = []
    args = [(s, str(baseline_root) if baseline_root else None) for s in specs]
    ctx = __import__("multiprocessing").get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for i, row in enumerate(pool.map(_compile_one, args, chunksize=4), 1):
            rows.append(row)
            if progress and (i % 25 == 0 or i == len(args)):
                print(f"kernel_report: {i}/{len(args)} compiled", file=sys.stderr, flush=True)
    return rows


# --- csrc through nvcc ---------------------------------------------------------------------------------------

def find_nvcc() -> str | None:
    sys.path.insert(0, str(REPO))
    from atv_sparse.ops.build_cuda import find_nvcc as _find

    return _find()


def compile_csrc(archs: list[str]) -> list[dict]:
    """Every csrc/*.cu to a cubin per architecture (nvcc, as the library is built), analysed the same way."""
    nvcc = find_nvcc()
    if nvcc is None:
        return [{"error": "nvcc not found: csrc not compiled"}]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for src in sorted((REPO / "csrc").glob("*.cu")):
                cubin = Path(tmp) / f"{src.stem}.sm_{arch}.cubin"
                proc = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-cubin", str(src), "-o", str(cubin)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    rows.append({"file": src.name, "arch": arch, "error": proc.stderr.strip()[-500:]})
                    continue
                for name, info in analyse_cubin(cubin).items():
                    rows.append({"file": src.name, "arch": arch, "function": demangle(name), **info})
    return rows


def demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if cxxfilt is None:
        return name
    return subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name


# --- the report ----------------------------------------------------------------------------------------------

def _mix(mix: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in mix.items()) or "-"


def _cfg(row: dict) -> str:
    c = row["config"]
    return "(" + ", ".join(str(c[k]) for k in sorted(c)) + f", w{row['warps']})"


def spills(row: dict) -> bool:
    return bool(row.get("stack") or row.get("local") or row.get("local_ops"))


def spill_text(row: dict) -> str:
    return f"stack {row['stack']} B, local {row['local']} B, {row['local_ops']} LDL/STL"


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    decode = [r for r in ok if r["family"] == "gemv" and r["block_m"] == 1 and (r["n"], r["m"]) in DEFAULT_PATTERNS]
    worst = max((r["loads_per_kept"] for r in decode), default=None)
    return {"compiled": len(ok), "errors": len(rows) - len(ok), "spills": sum(1 for r in ok if spills(r)),
            "worst_loads_per_kept_m1": worst, "compile_s": sum(r.get("compile_s", 0) for r in ok)}


def markdown(rows, base_rows, csrc_rows, meta) -> str:
    base = {r["key"]: r for r in base_rows or []}
    s = summarise(rows)
    lines = [f"# Kernel report (static, compiled ahead of time on a CPU)", "",
             f"{meta['date']} | triton {meta['triton']} | archs {', '.join('sm_' + a for a in meta['archs'])} | "
             f"layer {SHAPE_N} x {SHAPE_K} | mode {meta['mode']} | {s['compiled']} Triton kernels compiled in "
             f"{meta['wall_s']:.0f} s wall ({s['compile_s']:.0f} s of compilation)", "",
             "Loads per kept weight: load instructions (global and shared) per thread in the inner loop, "
             "divided by the kept weights a thread handles per iteration. Registers and stack from "
             "`cuobjdump -res-usage`; a stack or local-memory load is a spill.", ""]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}.", ""]
    if base:
        lines += [f"Before: {meta['baseline']} (sm_90a, M = 1, plain and gated).", ""]
    lines += ["## Decode kernel (`nm_gemv`) at M = 1, default patterns", "",
              "| pattern | dtype | variant | config (BLOCK_N, BLOCK_V, warps) | arch | regs | stack | smem B | "
              "inner-loop loads per thread | loads / kept weight |" + (" before: regs, stack, loads / kept |" if base else ""),
              "|---|---|---|---|---|---:|---:|---:|---|---:|" + ("---|" if base else "")]
    for r in rows:
        if "error" in r or r["family"] != "gemv" or r["block_m"] != 1 or (r["n"], r["m"]) not in DEFAULT_PATTERNS:
            continue
        b = base.get(r["key"])
        before = ""
        if base:
            before = (f" {b['regs']}, {b['stack']}, {b['loads_per_kept']:.2f} ({_mix(b['loop_loads'])}) |" if b and "error" not in b
                      else " - |")
        lines.append(f"| {r['n']}:{r['m']} | {r['dtype']} | {r['variant']} | {_cfg(r)}{' default' if r['default'] else ''} | "
                     f"sm_{r['arch']} | {r['regs']} | {r['stack']} | {r['shared']} | {_mix(r['loop_loads'])} | "
                     f"{r['loads_per_kept']:.2f} |{before}")
    if base:
        lines += ["", "## Before and after at M = 1 (sm_90a): loads per kept weight over every config autotune may "
                  "pick", "", "| pattern | dtype | variant | before: configs, max regs, loads / kept | after: configs, "
                  "max regs, loads / kept |", "|---|---|---|---|---|"]
        for pat in DEFAULT_PATTERNS:
            for dtype in DTYPES:
                for variant in ("plain", "gated"):
                    cells = []
                    for source in (list(base.values()), rows):
                        rs = [r for r in source if "error" not in r and r["family"] == "gemv" and r["block_m"] == 1
                              and (r["n"], r["m"]) == pat and r["dtype"] == dtype and r["variant"] == variant
                              and r["arch"] == "90a"]
                        lpk = [r["loads_per_kept"] for r in rs]
                        cells.append(f"{len(rs)}, {max(r['regs'] for r in rs)}, {min(lpk):.2f} .. {max(lpk):.2f}"
                                     if rs else "-")
                    lines.append(f"| {pat[0]}:{pat[1]} | {dtype} | {variant} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Every specialisation, summed up per family, pattern and token tile", "",
              "| kernel | pattern | BLOCK_M / M | compiled | max regs | spilling | loads / kept (best .. worst) |",
              "|---|---|---:|---:|---:|---:|---|"]
    groups: dict = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["family"], f"{r['n']}:{r['m']}", r["block_m"]), []).append(r)
    for (fam, pat, bm), rs in sorted(groups.items()):
        lpk = [r["loads_per_kept"] for r in rs if r["loads_per_kept"] is not None]
        lines.append(f"| {fam} | {pat} | {bm} | {len(rs)} | {max(r['regs'] for r in rs)} | "
                     f"{sum(1 for r in rs if spills(r))} | {min(lpk):.2f} .. {max(lpk):.2f} |")
    bad = [r for r in rows if "error" in r or spills(r)]
    lines += ["", "## Compile errors and spills", ""]
    lines += [f"- {r['key']}: {r.get('error') or spill_text(r)}" for r in bad] or ["None."]
    if base:
        bs = [r for r in base.values() if "error" not in r]
        lines += ["", f"Before ({meta['baseline']}): {len(bs)} compiled, {sum(1 for r in bs if spills(r))} spilling: "
                  + "; ".join(f"{r['key']} stack {r['stack']} B" for r in bs if spills(r))[:2000]]
    if csrc_rows:
        lines += ["", "## csrc kernels (nvcc -O3 -cubin)", "",
                  "| file | arch | function | regs | stack | smem B | inner-loop loads per thread |", "|---|---|---|---:|---:|---:|---|"]
        for r in csrc_rows:
            if "error" in r:
                lines.append(f"| {r.get('file', '-')} | {r.get('arch', '-')} | error: {r['error'][:200]} | | | | |")
            else:
                lines.append(f"| {r['file']} | sm_{r['arch']} | `{r['function'][:90]}` | {r['regs']} | {r['stack']} | "
                             f"{r['shared']} | {_mix(r['loop_loads'])} |")
    lines += ["", summary_line(s, csrc_rows)]
    return "\n".join(lines) + "\n"


def summary_line(s: dict, csrc_rows) -> str:
    csrc_spills = sum(1 for r in csrc_rows or [] if "error" not in r and spills(r))
    csrc_errors = sum(1 for r in csrc_rows or [] if "error" in r)
    worst = s["worst_loads_per_kept_m1"]
    return (f"kernel_report: {s['compiled']} Triton kernels compiled, {s['errors']} compile errors, {s['spills']} "
            f"spilling; csrc: {len(csrc_rows or []) - csrc_errors} functions, {csrc_spills} spilling, {csrc_errors} "
            f"errors; worst loads per kept weight at M = 1 (2:4 / 4:8 decode): "
            f"{'n/a' if worst is None else f'{worst:.2f}'}")


def baseline_kernels(rev: str, dest: Path) -> Path:
    """The Triton kernels of git revision ``rev`` written under ``dest`` (a package of its own); they
    live in atv_sparse/kernels/, in revisions before 2026-12-05 in a top-level kernels/."""
    root = dest / "kernels"
    root.mkdir(parents=True, exist_ok=True)
    folder = "atv_sparse/kernels"
    listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:{folder}"], capture_output=True,
                             text=True)
    if listing.returncode != 0:
        folder = "kernels"
        listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:{folder}"],
                                 capture_output=True, text=True, check=True)
    for name in listing.stdout.split():
        if name.endswith(".py"):
            text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{folder}/{name}"], capture_output=True,
                                  text=True, check=True).stdout
            (root / name).write_text(text)
    return root


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90a", help="comma-separated: 80, 90a (default both)")
    p.add_argument("--ci", action="store_true", help="the CI subset: token tiles 1, 4, 16 (and the GEMM); every "
                   "config for 2:4 fp16 plain on the last arch, the default config elsewhere; no csrc")
    p.add_argument("--all-patterns", action="store_true", help="also 1:4, 3:4, 1:8 ... 7:8 (the dispatcher runs any n:4 / n:8)")
    p.add_argument("--baseline-rev", help="git revision whose kernels give the 'before' columns")
    p.add_argument("--baseline-only", help="a regular expression: the baseline specialisations to compile "
                   "(default: those of --only)")
    p.add_argument("--no-csrc", action="store_true", help="skip the csrc kernels (nvcc)")
    p.add_argument("--only", help="a regular expression: compile only the specialisations whose key matches")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Markdown path (JSON beside it); '-' for stdout only")
    p.add_argument("--render", help="rewrite the Markdown from a JSON this script wrote (no compiling)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    if args.render:
        data = json.loads(Path(args.render).read_text())
        text = markdown(data["triton"], data["baseline"], data["csrc"], data["meta"])
        if args.out == "-":
            print(text)
        else:
            Path(args.out).write_text(text)
        print(summary_line(summarise(data["triton"]), data["csrc"]))
        return 0
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        print(f"kernel_report: unknown arch {unknown}; known: {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    patterns = DEFAULT_PATTERNS
    if args.all_patterns:
        patterns = tuple((n, m) for m in (4, 8) for n in range(1, m))
    start = time.perf_counter()
    specs = enumerate_specs(kernel_modules(), archs, patterns, args.ci)
    if args.only:
        specs = [s for s in specs if re.search(args.only, s.key)]
    rows = compile_all(specs, args.jobs)
    base_rows = None
    if args.baseline_rev:
        with tempfile.TemporaryDirectory() as tmp:
            root = baseline_kernels(args.baseline_rev, Path(tmp))
            base_modules = kernel_modules(root)
            base_specs = enumerate_specs(base_modules, archs, patterns, args.ci)
            base_only = args.baseline_only or args.only
            if base_only:
                base_specs = [s for s in base_specs if re.search(base_only, s.key)]
            # the same keys as today's rows where the configs match, so rows line up
            base_rows = compile_all(base_specs, args.jobs, root)
    csrc_rows = [] if args.no_csrc or args.ci else compile_csrc(archs)
    meta = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "archs": archs,
            "mode": "ci" if args.ci else "full", "wall_s": time.perf_counter() - start, "baseline": args.baseline_rev}
    text = markdown(rows, base_rows, csrc_rows, meta)
    if args.out == "-":
        print(text)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "triton": rows, "baseline": base_rows,
                                                        "csrc": csrc_rows}, separators=(",", ":"), default=str) + "\n")
    s = summarise(rows)
    print(summary_line(s, csrc_rows))
    csrc_bad = any("error" in r or spills(r) for r in csrc_rows)
    return 1 if s["errors"] or s["spills"] or csrc_bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would shrink the kernels' config lists
    sys.exit(main())
