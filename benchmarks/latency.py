"""Sparse vs dense linear latency on the real per-layer shapes of Llama-3-8B / Qwen2-7B, and
end-to-end decode (``--e2e``). Needs a CUDA GPU; without one it says so and exits 0, unless
``--device cpu`` (a dry run of every code path on tiny shapes, Triton's interpreter, CPU timers)
or ``--cpu`` (the cpu backend measured on this CPU: ``cpu_latency.py``).

    python benchmarks/latency.py --pattern 2:4,4:8 --shapes all --dtype fp16
    python benchmarks/latency.py --pattern 2:4 --e2e
    TRITON_INTERPRET=1 python benchmarks/latency.py --device cpu --shapes tiny --m 1,3 --e2e --e2e-shape tiny
    python benchmarks/latency.py --cpu --pattern 2:4,4:8 --m 1,4,16,128,512 --cpu-e2e

For each pattern x shape x M: dense cuBLAS time, each backend's time (eager, and replayed from a
CUDA graph, which hides per-call host costs such as cuSPARSELt's descriptor setup), speed-up over
dense, achieved GB/s, the time the bytes it must move take at the measured copy bandwidth
(``atv_sparse.ops.traffic``: the ideal) and achieved / ideal, and, for M <= 64, the share of the
bandwidth ceiling (dense weight bytes / sparse weight bytes: 2 / 1.125 = 1.78x for fp16 2:4 and
4:8). ``torch24`` is PyTorch's own 2:4 path (``to_sparse_semi_structured``), the anchor. Timings are medians of
``triton.testing.do_bench``; each timed call walks through enough copies of the weights to
exceed twice the L2 cache, so no call finds its weights there. Results: a Markdown table on
stdout and ``<gpu>-<date>.md`` / ``.json`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name: (out, in, gated); q/k/v and gate/up fused as the loader fuses them
    "llama3-8b": {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (28672, 4096, True),
                  "down": (4096, 14336, False)},
    "qwen2-7b": {"qkv": (4608, 3584, False), "o": (3584, 3584, False), "gate_up": (37888, 3584, True),
                 "down": (3584, 18944, False)},
    "tiny": {"qkv": (96, 64, False), "o": (64, 64, False), "gate_up": (256, 64, True), "down": (64, 128, False)},
}
DEFAULT_M = "1,4,16,64,256,1024,4096,8192"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ROTATE_BYTES = 2 * 50 * 2**20  # twice an H100's L2 (50 MB)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pattern", default="2:4,4:8", help="2:4, 4:8 or both, comma-separated (default both)")
    p.add_argument("--shapes", default="llama3-8b", choices=[*SHAPES, "all"], help="all: every model (not tiny)")
    p.add_argument("--m", default=DEFAULT_M, help=f"token counts, comma-separated (default {DEFAULT_M})")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--backends", default="cuda,triton,cusparselt,torch24,auto",
                   help="subset of cuda,cuda_sp24,triton,cusparselt,reference,torch24,auto (torch24: PyTorch's "
                        "to_sparse_semi_structured, 2:4 on CUDA); ones this machine lacks are reported and skipped")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of every code path (tiny shapes, TRITON_INTERPRET=1, CPU timers)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--e2e", action="store_true", help="also time Llama-3-8B-shaped decode and prefill")
    p.add_argument("--skip-layers", action="store_true", help="no per-layer timings (with --e2e: end to end only)")
    p.add_argument("--e2e-tokens", type=int, default=256)
    p.add_argument("--e2e-prefill", type=int, default=2048)
    p.add_argument("--e2e-layers", type=int, default=32, help="decoder layers for --e2e (32 = Llama-3-8B)")
    p.add_argument("--e2e-shape", default="llama3-8b", choices=["llama3-8b", "tiny"])
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    cpu = p.add_argument_group("--cpu: the cpu backend on this CPU (cpu_latency.py; Llama-3-8B shapes, bf16)")
    cpu.add_argument("--cpu", action="store_true", help="measure the cpu backend against torch dense here")
    cpu.add_argument("--cpu-e2e", action="store_true", help="with --cpu: greedy decode of a Llama-3.2-1B shape")
    cpu.add_argument("--threads", type=int, default=1, help="torch threads for --cpu (default 1)")
    cpu.add_argument("--rounds", type=int, default=6, help="interleaved rounds per cell (halved for M >= 128)")
    cpu.add_argument("--reps", type=int, default=6, help="calls per variant per round (halved for M >= 128)")
    cpu.add_argument("--no-reference", action="store_true", help="skip the (slow) reference backend")
    cpu.add_argument("--e2e-repeats", type=int, default=3, help="decode runs per model for --cpu-e2e")
    cpu.add_argument("--tag", default="", help="suffix of the result file names")
    cpu.add_argument("--layers", default="", help="with --cpu: a comma-separated subset of qkv,o,gate_up,down")
    return p.parse_args(argv)


def environment(device: str = "cuda") -> dict:
    import triton

    if device == "cpu":
        return {"gpu": f"cpu-{platform.machine()}", "sm": None, "memory_gib": None, "torch": torch.__version__,
                "cuda": None, "triton": triton.__version__, "cusparselt": None, "python": platform.python_version(),
                "date": datetime.date.today().isoformat()}
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "sm": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__,
            "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def cpu_median_ms(fn, reps: int = 3) -> float:
    """Median wall time of ``fn`` on the CPU (the dry run's timer: only the code path is checked)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_ms(fn, graph: bool, calls: int, device: str = "cuda") -> float:
    """Median ms of one call of ``fn`` (which makes ``calls`` calls), eager or from a CUDA graph."""
    from atv_sparse.ops.autotune import do_bench_median_ms

    if device == "cpu":
        return cpu_median_ms(fn) / calls
    if not graph:
        return do_bench_median_ms(fn, warmup=25, rep=200) / calls
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench_median_ms(g.replay, warmup=25, rep=200) / calls


def copy_bandwidth_gbs(device: str = "cuda") -> float:
    """Device-to-device copy of 1 GiB (16 MiB on a CPU): bytes read + written per second."""
    src = torch.empty(2**29 if device == "cuda" else 2**23, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), graph=False, calls=1, device=device)
    return 2 * src.numel() * 2 / ms / 1e6


def dense_call(weight, gated):
    if gated:
        half = weight.shape[0] // 2
        return lambda x: (lambda y: F.silu(y[..., :half]) * y[..., half:])(F.linear(x, weight))
    return lambda x: F.linear(x, weight)


def torch24_weights(dense_ws, pattern, gated):
    """PyTorch's own 2:4 layout of each magnitude-pruned copy, or (None, why not)."""
    if pattern != "2:4":
        return None, "PyTorch's semi-structured sparsity is 2:4 only"
    if dense_ws[0].device.type != "cuda":
        return None, "to_sparse_semi_structured needs CUDA"
    from atv_sparse.patterns import parse_pattern
    from atv_sparse.prune.masks import keep_mask

    two_four = parse_pattern("2:4")
    try:
        return [torch.sparse.to_sparse_semi_structured(w * keep_mask(w.abs().float(), two_four)) for w in dense_ws], None
    except (RuntimeError, ValueError) as exc:
        return None, f"to_sparse_semi_structured failed: {str(exc).splitlines()[0]}"


def bench_shape(out_f, in_f, gated, pattern, dtype, ms_list, backends, graphs, copy_gbs, device="cuda"):
    """Rows of the result table for one layer shape."""
    from atv_sparse.nn.prepare import prepare_model
    from atv_sparse.nn.sparse_linear import SparseLinear
    from atv_sparse.ops.cusparselt import search_alg_id
    from atv_sparse.ops.dispatch import TOKEN_LIMITS
    from atv_sparse.ops.traffic import bytes_moved, ideal_ms

    n, m_group = (int(v) for v in pattern.split(":"))
    elem = torch.finfo(dtype).bits // 8
    dense_bytes = out_f * in_f * elem
    rotate = ROTATE_BYTES if device == "cuda" else 0
    copies = max(2, math.ceil(rotate / dense_bytes))
    gen = torch.Generator(device=device).manual_seed(0)
    dense_ws = [torch.randn(out_f, in_f, generator=gen, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    layers, t24, t24_why = {}, None, None
    for backend in backends:
        if backend == "torch24":
            t24, t24_why = torch24_weights(dense_ws, pattern, gated)
            continue
        mods = []
        for w in dense_ws:
            lin = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            mods.append(SparseLinear.from_linear(lin, pattern, gated=gated, backend=backend,
                                                 name=f"{out_f}x{in_f}"))
        if backend == "auto":
            prepare_model(torch.nn.ModuleList(mods), "auto", progress=False)
        elif mods[0].backend_status(backend) is None:
            for mod in mods:
                mod.prepare()
        layers[backend] = mods
    first = next(iter(layers.values()), None)
    sparse_bytes = sum(first[0].resident_bytes()[k] for k in ("values", "bitmask")) if first else 0
    ceiling = dense_bytes / sparse_bytes if sparse_bytes else float("nan")
    rows = []
    for m in ms_list:
        x = torch.randn(m, in_f, device=device, dtype=dtype)
        out_cols = out_f // 2 if gated else out_f
        act_bytes = (m * in_f + m * out_cols) * elem
        dense_fns = [dense_call(w, gated) for w in dense_ws]
        row = {"out": out_f, "in": in_f, "gated": gated, "m": m, "ceiling": ceiling}
        for mode in ("eager", "graph") if graphs else ("eager",):
            t_dense = median_ms(lambda x=x, fns=dense_fns: [f(x) for f in fns], mode == "graph", copies, device)
            row[f"dense_{mode}_ms"] = t_dense
            row[f"dense_{mode}_gbs"] = (dense_bytes + act_bytes) / t_dense / 1e6
            dense_ideal = ideal_ms(bytes_moved(out_f, in_f, m, "dense", elem_bytes=elem, gated=gated)["total"], copy_gbs)
            row["dense_ideal_ms"] = dense_ideal
            row[f"dense_{mode}_of_ideal"] = dense_ideal / t_dense
            for backend in backends:
                if backend == "torch24":
                    if t24 is None:
                        row[f"torch24_{mode}_ms"], row["torch24_why"] = None, t24_why
                        continue
                    fns = [dense_call(w, gated) for w in t24]
                    t = median_ms(lambda x=x, fns=fns: [f(x) for f in fns], mode == "graph", copies, device)
                    layout = "cusparselt"  # values + 2-bit indices, as cuSPARSELt / CUTLASS store 2:4
                else:
                    mods = layers[backend]
                    mod0 = mods[0]
                    why = None if backend == "auto" else mod0.backend_status(backend)
                    if why is None and m > TOKEN_LIMITS.get(backend, m):
                        why = f"backend '{backend}' runs up to {TOKEN_LIMITS[backend]} tokens"
                    if why:
                        row[f"{backend}_{mode}_ms"] = None
                        row[f"{backend}_why"] = why
                        continue
                    if backend == "cusparselt":
                        if mode == "eager":
                            alg = search_alg_id(mod0.cslt_weight, mod0.dense_weight(), m, None, mod0.name)
                            row["cusparselt_alg_id"] = alg
                        alg = row["cusparselt_alg_id"]
                        fns = [lambda mod=mod, x=x, alg=alg: mod.run("cusparselt", x, alg) for mod in mods]
                    else:
                        fns = [lambda mod=mod, x=x: mod(x) for mod in mods]
                    t = median_ms(lambda fns=fns: [f() for f in fns], mode == "graph", copies, device)
                    layout = mod0.plan.pick(m)[0] if backend == "auto" else backend
                    if backend == "auto" and mode == "eager":
                        row["auto_choice"] = layout
                row[f"{backend}_{mode}_ms"] = t
                row[f"{backend}_{mode}_speedup"] = t_dense / t
                row[f"{backend}_{mode}_gbs"] = (sparse_bytes + act_bytes) / t / 1e6
                ideal = ideal_ms(bytes_moved(out_f, in_f, m, layout, n, m_group, elem, gated)["total"], copy_gbs)
                row[f"{backend}_ideal_ms"] = ideal
                row[f"{backend}_{mode}_of_ideal"] = ideal / t
                if m <= 64:
                    row[f"{backend}_{mode}_of_ceiling"] = (t_dense / t) / ceiling
                    row[f"{backend}_{mode}_of_copy_bw"] = row[f"{backend}_{mode}_gbs"] / copy_gbs
        rows.append(row)
    del layers, dense_ws
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_e2e(pattern, dtype, args):
    """Llama-3-8B-shaped decode at batch 1 (static KV cache, CUDA graph) and prefill, dense vs sparse."""
    from atv_sparse.nn.prepare import prepare_model
    from llama_decode import LLAMA3_8B, LlamaDecoder, LlamaShape, generate, init_random, sparsify

    device = args.device
    shape = LLAMA3_8B if args.e2e_shape == "llama3-8b" else LlamaShape(64, 2, 4, 2, 128, 512)
    shape.n_layers = args.e2e_layers if args.e2e_shape == "llama3-8b" else shape.n_layers
    max_seq = max(args.e2e_prefill, 16) + args.e2e_tokens + 8  # the decode prompt is 16 tokens
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of 8B parameters
    try:
        with torch.device(device):
            model = LlamaDecoder(shape, max_seq=max_seq)
    finally:
        torch.set_default_dtype(default)
    init_random(model)
    prompt = torch.randint(0, shape.vocab, (1, 16), device=device)
    long_prompt = torch.randint(0, shape.vocab, (1, args.e2e_prefill), device=device)
    result = {}
    for kind in ("dense", "sparse"):
        if kind == "sparse":
            sparsify(model, pattern, backend="auto" if device == "cuda" else "triton")
            prepare_model(model, "auto" if device == "cuda" else "triton", progress=False)
            result["sparse_plans"] = sorted({m.plan.summary() for m in model.modules() if hasattr(m, "plan")
                                             and m.plan is not None})
        with torch.no_grad():
            tokens, seconds = generate(model, prompt, args.e2e_tokens, cuda_graph=device == "cuda")
            pos = torch.arange(args.e2e_prefill, device=device)
            prefill_ms = median_ms(partial(model, long_prompt, pos), graph=False, calls=1, device=device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            b.numel() * b.element_size() for n, b in model.named_buffers() if "weight" in n)
        result[kind] = {"tokens_per_s": args.e2e_tokens / seconds, "prefill_ms": prefill_ms,
                        "weight_gib": weight_bytes / 2**30, "first_tokens": tokens[0, :8].tolist()}
    result["decode_speedup"] = result["sparse"]["tokens_per_s"] / result["dense"]["tokens_per_s"]
    result["prefill_speedup"] = result["dense"]["prefill_ms"] / result["sparse"]["prefill_ms"]
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(env, copy_gbs, results, backends, graphs) -> str:
    lines = [f"# Sparse linear latency: {env['gpu']}", "",
             f"{env['date']} | torch {env['torch']} | CUDA {env['cuda']} | triton {env['triton']} | cuSPARSELt "
             f"{env['cusparselt']} | copy bandwidth {copy_gbs:.0f} GB/s", "",
             "Ideal: the bytes a call must move (weight in the backend's layout, activations, output; "
             "atv_sparse.ops.traffic) at the copy bandwidth; % of ideal = ideal / achieved time.", ""]
    mode = "graph" if graphs else "eager"
    for key, rows in results["layers"].items():
        lines += [f"## {key} ({mode} timings; eager in the JSON)", "",
                  "| layer | M | dense ms (% of ideal) | " + " | ".join(f"{b} ms (x dense, GB/s, % of ideal)" for b in backends)
                  + " |",
                  "|---|---:|---:|" + "---:|" * len(backends)]
        for r in rows:
            cells = []
            for b in backends:
                t = r.get(f"{b}_{mode}_ms")
                if t is None:
                    cells.append("n/a")
                    continue
                cells.append(f"{t:.4f} ({r[f'{b}_{mode}_speedup']:.2f}x, {r[f'{b}_{mode}_gbs']:.0f}, "
                             f"{r[f'{b}_{mode}_of_ideal']:.0%})" + (f" [{r['auto_choice']}]" if b == "auto" else ""))
            lines.append(f"| {r['layer']} {r['out']}x{r['in']} | {r['m']} | {r[f'dense_{mode}_ms']:.4f} "
                         f"({r[f'dense_{mode}_of_ideal']:.0%}) | " + " | ".join(cells) + " |")
        lines.append("")
    for key, e2e in results.get("e2e", {}).items():
        lines += [f"## End to end, {key}", "",
                  "| | dense | sparse | speed-up |", "|---|---:|---:|---:|",
                  f"| decode tokens/s (batch 1, CUDA graph) | {e2e['dense']['tokens_per_s']:.1f} | "
                  f"{e2e['sparse']['tokens_per_s']:.1f} | {e2e['decode_speedup']:.2f}x |",
                  f"| prefill ms | {e2e['dense']['prefill_ms']:.1f} | {e2e['sparse']['prefill_ms']:.1f} | "
                  f"{e2e['prefill_speedup']:.2f}x |",
                  f"| weights GiB | {e2e['dense']['weight_gib']:.2f} | {e2e['sparse']['weight_gib']:.2f} | |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        import cpu_latency

        shapes = SHAPES["tiny" if args.shapes == "tiny" else "llama3-8b"]
        command = "python benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
        return cpu_latency.run(args, shapes, command)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("latency.py: no CUDA GPU on this machine; nothing to measure (the kernels' CPU tests run under "
              "TRITON_INTERPRET=1 in the test suite; --device cpu dry-runs this script).")
        return 0
    from atv_sparse.ops import available_backends

    dtype = DTYPES[args.dtype]
    patterns = [p.strip() for p in args.pattern.split(",") if p.strip()]
    ms_list = [int(v) for v in args.m.split(",")]
    shape_sets = [k for k in SHAPES if k != "tiny"] if args.shapes == "all" else [args.shapes]
    here = available_backends(args.device)
    backends = []
    for b in args.backends.split(","):
        if b in ("auto", "torch24") or b in here:
            backends.append(b)
        else:
            print(f"latency.py: backend {b!r} is not available here (available: {', '.join(here)}); skipped")
    graphs = not args.no_graphs and args.device == "cuda"
    env = environment(args.device)
    copy_gbs = copy_bandwidth_gbs(args.device)
    print(f"{env['gpu']}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    results = {"env": env, "copy_gbs": copy_gbs, "args": vars(args), "layers": {}, "e2e": {}}
    for pattern in patterns:
        for shape_set in [] if args.skip_layers else shape_sets:
            rows = []
            for layer, (out_f, in_f, gated) in SHAPES[shape_set].items():
                print(f"{pattern} {shape_set} {layer} {out_f}x{in_f}", flush=True)
                for r in bench_shape(out_f, in_f, gated, pattern, dtype, ms_list, backends, graphs, copy_gbs,
                                     args.device):
                    rows.append({"layer": layer, **r})
            results["layers"][f"{pattern} {shape_set} {args.dtype}"] = rows
        if args.e2e:
            print(f"{pattern} end to end", flush=True)
            results["e2e"][f"{pattern} {args.e2e_shape} {args.dtype}"] = bench_e2e(pattern, dtype, args)
    text = markdown(env, copy_gbs, results, backends, graphs)
    print(text)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower() + f"-{env['date']}"
    (out_dir / f"{stem}.md").write_text(text + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {out_dir / stem}.md and .json")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
