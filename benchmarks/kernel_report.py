"""Static report of every kernel the dispatcher can launch, compiled ahead of time on the CPU.

    python benchmarks/kernel_report.py                       # every specialisation, sm_80 and sm_90a
    python benchmarks/kernel_report.py --ci                  # the CI subset (a few minutes on 2 cores)
    python benchmarks/kernel_report.py --no-csrc             # Triton only (no nvcc, no default-decode check)
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

Every instruction of the inner loop is counted too (``instr / kept``: SASS instructions per thread
per iteration over the kept weights a thread handles per iteration; per kept weight and token for
a token tile of more than one). An SM issues at most 4 warp-instructions, 128 thread-instructions,
per cycle, so a kernel retires at most 128 / (instr / kept) kept weights per cycle per SM (at
100% issue; 65% is a realistic rate for this mix of loads and arithmetic). The **static speed-up
bound** of a decode kernel on a GPU (``GPUS``: SM count, clock, HBM bandwidth, written into the
report) is dense fp16's time at full bandwidth over the larger of the sparse kernel's time at full
bandwidth (bytes from ``atv_sparse/ops/traffic.py``) and its time at that issue rate:
min(bytes ceiling, issue bound). It is an upper bound, not a prediction: it ignores latency,
occupancy, tails and the launch. The first GPU run checks it (``benchmarks/gpu_suite.py`` runs
``benchmarks/latency.py``): a measured speed-up above the 100% bound means the count is wrong; one
far below the 65% bound means something other than issue and bytes limits the kernel.

csrc kernels: the kept weights of an iteration are 8 per 16-byte streaming weight load
(``ld.global.nc.L1::no_allocate.v4``, SASS ``LDG.E.NA.128``), their token tile is read from the
template arguments (``nm_decode_kernel<T, MT, GATED>``: MT tokens; ``sp24_decode_kernel<T, NT,
GATED>``: 8 NT).

Writes Markdown (``--out``, default benchmarks/results/kernel-report.md) and JSON beside it. The
last line sums it up; the exit status is 1 on a compile error or a spill in a config autotune may
pick (a spill in the decode kernel is a silent slowdown a CPU machine can catch), or when the
dispatcher's default decode kernel at M = 1 (what ``heuristic_plan`` runs for one token on a GPU)
has a static bound below ``MIN_DECODE_BOUND`` at 65% issue on a GPU of ``GPUS``, for 2:4 or 4:8.
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
# Datasheet figures (boost clock, HBM bandwidth) of the GPUs the static bound is computed for.
GPUS = {"A100": {"name": "A100 SXM4 80 GB", "sms": 108, "clock_ghz": 1.41, "bandwidth_tbs": 2.039},
        "H100": {"name": "H100 SXM5 80 GB", "sms": 132, "clock_ghz": 1.98, "bandwidth_tbs": 3.35}}
ISSUE_PER_SM = 128        # thread-instructions an SM issues per cycle: 4 schedulers x 1 warp-instruction
ISSUE_RATES = (1.0, 0.65)  # perfect issue, and a realistic rate for a load-heavy loop
MIN_DECODE_BOUND = 1.6    # the least static bound (at 65% issue) the default decode kernel may have at M = 1
# Instruction targets of the csrc decode kernels (kernel, template tile) -> (column, most allowed):
# 2:4 on the sparse tensor cores at most 2 per kept weight at M = 1 and 1 per kept weight and token at
# M = 16; the CUDA-core kernel (what 4:8 runs) under 8 per kept weight at M = 1.
CSRC_TARGETS = {("sp24_decode_kernel", 1): ("instr_per_kept", 2.0),
                ("sp24_decode_kernel", 2): ("instr_per_kept_token", 1.0),
                ("nm_decode_kernel", 1): ("instr_per_kept", 7.99)}


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


def op_mix(body) -> dict[str, int]:
    """{opcode without modifiers: count} of every instruction in ``body``, most frequent first."""
    mix: dict[str, int] = {}
    for _, op, _ in body:
        head = op.split(".")[0]
        mix[head] = mix.get(head, 0) + 1
    return dict(sorted(mix.items(), key=lambda kv: (-kv[1], kv[0])))


def streaming_loads16(body) -> int:
    """16-byte loads that bypass L1 (``LDG.E.NA.128``): how the csrc kernels stream weight values."""
    return sum(1 for _, op, _ in body if op.startswith("LDG") and ".NA." in op + "." and ".128" in op)


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
                        "loop_ops": op_mix(body), "loop_weight_loads16": streaming_loads16(body),
                        "loop_opcodes": sorted({op for _, op, _ in body}),
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
    row.update(budget(info["loop_len"], kept, spec.block_m if spec.family == "gemv" else GEMM_M, spec.n, spec.m,
                      "triton"))
    return row


# --- the instruction budget ------------------------------------------------------------------------------

def static_bound(instr_per_kept: float, n: int, m: int, tokens: int, layout: str, gpu: dict, rate: float) -> float:
    """Upper bound on the speed-up over dense fp16 of a sparse kernel issuing ``instr_per_kept``
    instructions per kept weight, on the report's layer at ``tokens`` tokens: dense time at full
    bandwidth / max(sparse bytes at full bandwidth, kept weights at ``rate`` of the SM's issue)."""
    from atv_sparse.ops.traffic import bytes_moved

    bandwidth = gpu["bandwidth_tbs"] * 1e12
    dense_s = bytes_moved(SHAPE_N, SHAPE_K, tokens, "dense")["total"] / bandwidth
    bytes_s = bytes_moved(SHAPE_N, SHAPE_K, tokens, layout, n, m)["total"] / bandwidth
    kept_per_s = ISSUE_PER_SM * rate / instr_per_kept * gpu["sms"] * gpu["clock_ghz"] * 1e9
    issue_s = SHAPE_N * SHAPE_K * n / m / kept_per_s
    return dense_s / max(bytes_s, issue_s)


def budget(loop_len: int, kept: float, tokens: int, n: int, m: int, layout: str) -> dict:
    """The instruction-budget columns of one kernel: instructions per kept weight (and per token),
    kept weights per cycle per SM at each issue rate, and the static bound per GPU and rate at
    ``tokens`` tokens (only for decode-sized tiles: the GEMM is not bandwidth-bound)."""
    if not kept or not loop_len:
        return {}
    ipk = loop_len / kept
    out = {"instr_per_kept": ipk, "instr_per_kept_token": ipk / tokens, "tokens": tokens,
           "kept_per_cycle": {f"{r:.2f}": ISSUE_PER_SM * r / ipk for r in ISSUE_RATES}}
    if tokens <= 16:
        out["bound"] = {g: {f"{r:.2f}": static_bound(ipk, n, m, tokens, layout, spec, r) for r in ISSUE_RATES}
                        for g, spec in GPUS.items()}
    return out


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


def compile_csrc(archs: list[str], names: tuple[str, ...] | None = None) -> list[dict]:
    """Every csrc/*.cu (or those named) to a cubin per architecture (nvcc, as the library is built),
    analysed the same way."""
    nvcc = find_nvcc()
    if nvcc is None:
        return [{"error": "nvcc not found: csrc not compiled"}]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for src in sorted((REPO / "csrc").glob("*.cu")):
                if names is not None and src.name not in names:
                    continue
                cubin = Path(tmp) / f"{src.stem}.sm_{arch}.cubin"
                proc = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-cubin", str(src), "-o", str(cubin)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    rows.append({"file": src.name, "arch": arch, "error": proc.stderr.strip()[-500:]})
                    continue
                for name, info in analyse_cubin(cubin).items():
                    row = {"file": src.name, "arch": arch, "function": demangle(name), **info}
                    row.update(csrc_budget(row))
                    rows.append(row)
    return rows


_CSRC_KERNEL = re.compile(r"(nm_decode_kernel|sp24_decode_kernel)<(__half|__nv_bfloat16), (\d+), (true|false)>")


def csrc_kernel(function: str) -> dict | None:
    """{"kernel", "dtype", "tokens", "gated", "patterns", "layout"} of a csrc decode kernel's name, else None."""
    match = _CSRC_KERNEL.search(function)
    if not match:
        return None
    kernel, t, tile, gated = match.groups()
    sp24 = kernel == "sp24_decode_kernel"
    return {"kernel": kernel, "dtype": "fp16" if t == "__half" else "bf16", "tile": int(tile),
            "tokens": 8 * int(tile) if sp24 else int(tile), "gated": gated == "true",
            "patterns": ((2, 4),) if sp24 else DEFAULT_PATTERNS, "layout": "cuda_sp24" if sp24 else "cuda"}


def csrc_budget(row: dict) -> dict:
    """Budget columns of a csrc decode kernel per pattern it serves, at its token tile and at M = 1."""
    k = csrc_kernel(row["function"])
    if k is None or not row.get("loop_weight_loads16"):
        return {}
    kept = 8 * row["loop_weight_loads16"]
    out = {"csrc_kernel": k, "kept_per_thread": kept, "budget": {}}
    for n, m in k["patterns"]:
        b = budget(row["loop_len"], kept, k["tokens"], n, m, k["layout"])
        b["bound_m1"] = {g: {f"{r:.2f}": static_bound(b["instr_per_kept"], n, m, 1, k["layout"], spec, r)
                             for r in ISSUE_RATES} for g, spec in GPUS.items()}
        out["budget"][f"{n}:{m}"] = b
    return out


def decode_default_backend(n: int, m: int) -> str:
    """The backend ``heuristic_plan`` runs for one token on a GPU where every kernel is usable."""
    import torch
    from atv_sparse.ops.dispatch import KERNEL_BACKENDS, heuristic_plan, layer_status

    usable = [b for b in KERNEL_BACKENDS if layer_status(b, n, m, torch.float16, SHAPE_N, SHAPE_K) is None]
    return heuristic_plan(usable, False).pick(1)[0]


def csrc_target_problems(csrc_rows: list[dict]) -> list[str]:
    """Lines naming csrc decode kernels over their CSRC_TARGETS, or sp24 kernels whose loop has no
    sparse MMA (HMMA.SP); one line when no kernel of a target was compiled."""
    problems, seen = [], set()
    for r in csrc_rows:
        k = r.get("csrc_kernel")
        if k is None:
            continue
        where = f"{r['function']} sm_{r['arch']}"
        if k["kernel"] == "sp24_decode_kernel" and not any(op.startswith("HMMA.SP") for op in r.get("loop_opcodes", ())):
            problems.append(f"{where}: no HMMA.SP in the inner loop")
        target = CSRC_TARGETS.get((k["kernel"], k["tile"]))
        if target is None:
            continue
        seen.add((k["kernel"], k["tile"]))
        column, limit = target
        for pattern, b in r["budget"].items():
            if b[column] > limit:
                problems.append(f"{where} ({pattern}): {column} {b[column]:.2f} above {limit}")
    problems += [f"unchecked: no compiled {kernel}<T, {tile}> for its instruction target"
                 for kernel, tile in CSRC_TARGETS if (kernel, tile) not in seen]
    return problems


def decode_default_check(rows: list[dict], csrc_rows: list[dict]) -> list[str]:
    """Lines naming every default decode kernel at M = 1 (per pattern: the backend heuristic_plan
    picks) whose static bound at 65% issue is below MIN_DECODE_BOUND on a GPU of GPUS, and every
    csrc kernel over its instruction target (``csrc_target_problems``); a line starting with
    "unchecked" when the kernels a check needs were not compiled."""
    problems = csrc_target_problems(csrc_rows)
    for n, m in DEFAULT_PATTERNS:
        backend = decode_default_backend(n, m)
        if backend == "triton":
            cells = [(r["key"], r["bound"]) for r in rows if "error" not in r and r["family"] == "gemv"
                     and r["block_m"] == 1 and (r["n"], r["m"]) == (n, m) and r["default"] and "bound" in r]
        else:
            cells = [(f"{r['function']} sm_{r['arch']}", r["budget"][f"{n}:{m}"]["bound_m1"]) for r in csrc_rows
                     if "budget" in r and f"{n}:{m}" in r["budget"] and r["csrc_kernel"]["layout"] == backend
                     and r["csrc_kernel"]["tile"] == 1]
        if not cells:
            problems.append(f"unchecked {n}:{m}: no compiled kernel of the default decode backend '{backend}'")
        for key, bound in cells:
            for gpu in GPUS:
                value = bound[gpu][f"{ISSUE_RATES[-1]:.2f}"]
                if value < MIN_DECODE_BOUND:
                    problems.append(f"{n}:{m} default decode ({backend}) {key}: static bound {value:.2f}x on {gpu} "
                                    f"at {ISSUE_RATES[-1]:.0%} issue, below {MIN_DECODE_BOUND}x")
    return problems


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
             "`cuobjdump -res-usage`; a stack or local-memory load is a spill.", "",
             *budget_preamble()]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}.", ""]
    if base:
        lines += [f"Before: {meta['baseline']} (sm_90a, M = 1, plain and gated).", ""]
    lines += ["## Decode kernel (`nm_gemv`) at M = 1, default patterns", "",
              "| pattern | dtype | variant | config (BLOCK_N, BLOCK_V, warps) | arch | regs | stack | smem B | "
              "inner-loop loads per thread | loads / kept weight | instr / kept | bound A100, H100 at 65% |"
              + (" before: regs, stack, loads / kept |" if base else ""),
              "|---|---|---|---|---|---:|---:|---:|---|---:|---:|---|" + ("---|" if base else "")]
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
                     f"{r['loads_per_kept']:.2f} | {_ipk(r)} | {_bounds(r.get('bound'), ISSUE_RATES[-1:])} |{before}")
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
              "| kernel | pattern | BLOCK_M / M | compiled | max regs | spilling | loads / kept (best .. worst) | "
              "instr / kept / token (best .. worst) |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    groups: dict = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["family"], f"{r['n']}:{r['m']}", r["block_m"]), []).append(r)
    for (fam, pat, bm), rs in sorted(groups.items()):
        lpk = [r["loads_per_kept"] for r in rs if r["loads_per_kept"] is not None]
        ipt = [r["instr_per_kept_token"] for r in rs if r.get("instr_per_kept_token") is not None]
        lines.append(f"| {fam} | {pat} | {bm} | {len(rs)} | {max(r['regs'] for r in rs)} | "
                     f"{sum(1 for r in rs if spills(r))} | {min(lpk):.2f} .. {max(lpk):.2f} | "
                     f"{f'{min(ipt):.2f} .. {max(ipt):.2f}' if ipt else '-'} |")
    bad = [r for r in rows if "error" in r or spills(r)]
    lines += ["", "## Compile errors and spills", ""]
    lines += [f"- {r['key']}: {r.get('error') or spill_text(r)}" for r in bad] or ["None."]
    if base:
        bs = [r for r in base.values() if "error" not in r]
        lines += ["", f"Before ({meta['baseline']}): {len(bs)} compiled, {sum(1 for r in bs if spills(r))} spilling: "
                  + "; ".join(f"{r['key']} stack {r['stack']} B" for r in bs if spills(r))[:2000]]
    if csrc_rows:
        lines += csrc_budget_table(csrc_rows)
    targets = "; ".join(f"`{k}<T, {tile}>` {col.replace('_', ' ')} <= {limit}"
                        for (k, tile), (col, limit) in CSRC_TARGETS.items())
    lines += ["", "## Default decode kernels at M = 1 against the line, and the csrc instruction targets", "",
              f"The backend `heuristic_plan` runs for one token on a GPU with every kernel: "
              f"{', '.join(f'{n}:{m} `{decode_default_backend(n, m)}`' for n, m in DEFAULT_PATTERNS)}. "
              f"Each of its M = 1 kernels must have a static bound of at least {MIN_DECODE_BOUND}x at "
              f"{ISSUE_RATES[-1]:.0%} issue on every GPU above. Targets: {targets}; every `sp24_decode_kernel` "
              "loop holds HMMA.SP.", ""]
    check = meta.get("decode_check")
    lines += (["Not checked: csrc was not compiled (--no-csrc)."] if check is None
              else [f"- {p}" for p in check] or ["All above the line."])
    if csrc_rows:
        lines += ["", "## csrc kernels (nvcc -O3 -cubin)", "",
                  "| file | arch | function | regs | stack | smem B | inner-loop loads per thread |", "|---|---|---|---:|---:|---:|---|"]
        for r in csrc_rows:
            if "error" in r:
                lines.append(f"| {r.get('file', '-')} | {r.get('arch', '-')} | error: {r['error'][:200]} | | | | |")
            else:
                lines.append(f"| {r['file']} | sm_{r['arch']} | `{r['function'][:90]}` | {r['regs']} | {r['stack']} | "
                             f"{r['shared']} | {_mix(r['loop_loads'])} |")
    lines += ["", summary_line(s, csrc_rows, meta.get("decode_check"))]
    return "\n".join(lines) + "\n"


def budget_preamble() -> list[str]:
    """The report's explanation of the instruction columns and the GPUs the bound assumes."""
    gpus = "; ".join(f"{g} ({v['name']}): {v['sms']} SMs, {v['clock_ghz']} GHz, {v['bandwidth_tbs']} TB/s"
                     for g, v in GPUS.items())
    return ["Instructions per kept weight (`instr / kept`): every SASS instruction of the inner loop per thread, "
            "over the kept weights a thread handles per iteration; per token when the tile holds several. "
            f"An SM issues at most {ISSUE_PER_SM} thread-instructions per cycle, so `kept / cycle / SM` = "
            f"{ISSUE_PER_SM} x issue rate / (instr / kept), at 100% and at a realistic 65%. The **static bound** "
            "is dense fp16 at full bandwidth over the larger of the sparse bytes at full bandwidth "
            "(`atv_sparse/ops/traffic.py`) and the kept weights at that issue rate, on the layer above: "
            "min(bytes ceiling, issue bound). It is an upper bound, not a prediction (no latency, occupancy, "
            "tails or launch); the first GPU run checks it with `benchmarks/latency.py` (via "
            "`benchmarks/gpu_suite.py`): a measured speed-up above the 100% bound means the count is wrong, one "
            f"far below the 65% bound that something else limits the kernel. GPUs: {gpus}.", ""]


def _ipk(r: dict) -> str:
    return f"{r['instr_per_kept']:.1f}" if r.get("instr_per_kept") else "-"


def _bounds(bound: dict | None, rates=ISSUE_RATES) -> str:
    if not bound:
        return "-"
    return ", ".join(" / ".join(f"{bound[g][f'{r:.2f}']:.2f}" for r in rates) for g in GPUS)


def csrc_budget_table(csrc_rows: list[dict]) -> list[str]:
    """The csrc decode kernels' instruction budget, per pattern they serve."""
    lines = ["", "## Instruction budget of the csrc decode kernels", "",
             "kept / iter: kept weights a thread handles per inner-loop iteration (8 per 16-byte streaming weight "
             "load). Bounds at M = 1 (the kernels whose tile serves one token) and at the tile's token count, as "
             "A100 100% / 65%, H100 100% / 65%.", "",
             "| kernel | arch | pattern | tokens | loop instr | kept / iter | instr / kept | instr / kept / token | "
             "kept / cycle / SM (100%, 65%) | bound at M = 1 | bound at the tile | loop mix |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in csrc_rows:
        if "budget" not in r:
            continue
        k = r["csrc_kernel"]
        name = f"`{k['kernel']}<{k['dtype']}, {k['tile']}{', gated' if k['gated'] else ''}>`"
        top = ", ".join(f"{v} {op}" for op, v in list(r["loop_ops"].items())[:6])
        for pattern, b in r["budget"].items():
            m1 = _bounds(b["bound_m1"]) if k["tile"] == 1 else "-"
            lines.append(f"| {name} | sm_{r['arch']} | {pattern} | {k['tokens']} | {r['loop_len']} | "
                         f"{r['kept_per_thread']} | {b['instr_per_kept']:.2f} | {b['instr_per_kept_token']:.3f} | "
                         f"{b['kept_per_cycle']['1.00']:.1f}, {b['kept_per_cycle']['0.65']:.1f} | {m1} | "
                         f"{_bounds(b.get('bound'))} | {top} |")
    return lines


def summary_line(s: dict, csrc_rows, decode_check: list[str] | None = None) -> str:
    csrc_spills = sum(1 for r in csrc_rows or [] if "error" not in r and spills(r))
    csrc_errors = sum(1 for r in csrc_rows or [] if "error" in r)
    worst = s["worst_loads_per_kept_m1"]
    return (f"kernel_report: {s['compiled']} Triton kernels compiled, {s['errors']} compile errors, {s['spills']} "
            f"spilling; csrc: {len(csrc_rows or []) - csrc_errors} functions, {csrc_spills} spilling, {csrc_errors} "
            f"errors; worst loads per kept weight at M = 1 (2:4 / 4:8 decode): "
            f"{'n/a' if worst is None else f'{worst:.2f}'}"
            + ("" if decode_check is None else
               f"; default decode bound check: {'ok' if not decode_check else f'{len(decode_check)} problems'}"))


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
                   "config for 2:4 fp16 plain on the last arch, the default config elsewhere; csrc as in a full run")
    p.add_argument("--all-patterns", action="store_true", help="also 1:4, 3:4, 1:8 ... 7:8 (the dispatcher runs any n:4 / n:8)")
    p.add_argument("--baseline-rev", help="git revision whose kernels give the 'before' columns")
    p.add_argument("--baseline-only", help="a regular expression: the baseline specialisations to compile "
                   "(default: those of --only)")
    p.add_argument("--no-csrc", action="store_true", help="skip the csrc kernels (nvcc)")
    p.add_argument("--only", help="a regular expression: compile only the specialisations whose key matches")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Markdown path (JSON beside it); '-' for stdout only")
    p.add_argument("--render", help="rewrite the Markdown from a JSON this script wrote (no compiling)")
    p.add_argument("--note", help="a sentence printed under the report's header (e.g. why a run was partial)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    if args.render:
        data = json.loads(Path(args.render).read_text())
        if args.note:
            data["meta"]["note"] = args.note
        text = markdown(data["triton"], data["baseline"], data["csrc"], data["meta"])
        if args.out == "-":
            print(text)
        else:
            Path(args.out).write_text(text)
        print(summary_line(summarise(data["triton"]), data["csrc"], data["meta"].get("decode_check")))
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
    csrc_rows = [] if args.no_csrc else compile_csrc(archs)
    decode_check = None if args.no_csrc else decode_default_check(rows, csrc_rows)
    meta = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "archs": archs,
            "mode": "ci" if args.ci else "full", "wall_s": time.perf_counter() - start, "baseline": args.baseline_rev,
            "gpus": GPUS, "decode_check": decode_check, "note": args.note}
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
    for problem in decode_check or []:
        print(f"kernel_report: {problem}", file=sys.stderr)
    print(summary_line(s, csrc_rows, decode_check))
    csrc_bad = any("error" in r or spills(r) for r in csrc_rows)
    return 1 if s["errors"] or s["spills"] or csrc_bad or decode_check else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would shrink the kernels' config lists
    sys.exit(main())
