"""The ``cpu`` backend against torch's dense linear on this CPU, per layer and end to end.

Run through ``latency.py`` (``python benchmarks/latency.py --cpu``; ``--cpu-e2e`` adds decode).

Per layer (Llama-3-8B shapes, q/k/v and gate/up fused as ``atv_sparse.load`` fuses them), per
pattern and token count M, in bf16: the cpu backend (``atv_sparse::nm_linear_cpu``), torch dense
bf16 and fp32 ``F.linear`` (gate/up: plus ``silu(g) * u``), the reference backend (decompress +
``F.linear``; at M = 1 only: it costs the same at every M) and a streaming read of the compressed
bytes (``cpu_lib.stream_read``, the bandwidth the kernel is measured against). All variants run
interleaved, ``--rounds`` rounds of ``--reps`` calls each, and each call walks to the next of
enough copies of its weights to exceed twice the L3 cache (64 MB), so no call finds its weights
there. A call counts as unpreempted when no thread of this process waited on a run queue during
it (``/proc/self/task/*/schedstat``, second field; waits under 20 us are ignored): reported are
the median of unpreempted calls and the minimum of all calls, and the share of unpreempted calls.
Where a variant of a row has fewer than 3 unpreempted calls (calls of several ms on this loaded
machine), every variant of that row is compared on its median run time instead (wall time minus
the run-queue wait), and the row says so (``basis``).

End to end (``--cpu-e2e``): ``llama_decode.LlamaDecoder`` with a Llama-3.2-1B shape and random
weights in bf16, greedy decode through one loop, dense first, then every decoder linear swapped for
a magnitude-pruned ``SparseLinear`` (gate/up gated) on the cpu backend: tokens/s (median and best
step, unpreempted steps), the resident bytes of the decoder linears and the process's RSS.

Results: ``cpu-<cpu model>-<date>.md`` / ``.json`` / ``.png`` (speed-up over torch dense bf16 per
shape against M, with the bytes ceiling 16 / 9 = 1.78x) in ``--out-dir``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

L3_ROTATE_BYTES = 64 * 2**20
QUIET_NS = 20_000  # run-queue waits below this are scheduler noise, not a preemption
LLAMA32_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate=8192, vocab=128256)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=128, vocab=512)  # a dry run


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict:
    from atv_sparse.ops import cpu_lib

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "paths": list(cpu_lib.cpu_paths()),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_avg_start": os.getloadavg()}


def run_queue_wait_ns() -> int:
    """Nanoseconds all threads of this process have waited on a run queue so far."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            total += int(Path(f"/proc/self/task/{task}/schedstat").read_text().split()[1])
        except (FileNotFoundError, IndexError):  # a thread that ended between listdir and read
            pass
    return total


def timed_calls(fn, reps: int) -> list[tuple[float, int]]:
    """(seconds, run-queue wait in ns) of ``reps`` calls of ``fn``."""
    out = []
    for _ in range(reps):
        before = run_queue_wait_ns()
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        out.append((seconds, run_queue_wait_ns() - before))
    return out


def summarize(calls: list[tuple[float, int]]) -> dict:
    """median of unpreempted calls (None under 3 of them), median run time (wall time minus the
    run-queue wait: the fallback on a machine too loaded for unpreempted calls), minimum."""
    clean = [s for s, wait in calls if wait < QUIET_NS]
    return {"median_ms": statistics.median(clean) * 1e3 if len(clean) >= 3 else None,
            "run_median_ms": statistics.median(max(s - wait / 1e9, 0.0) for s, wait in calls) * 1e3,
            "min_ms": min(s for s, _ in calls) * 1e3, "unpreempted": len(clean), "calls": len(calls)}


def interleaved(variants: dict, rounds: int, reps: int) -> dict:
    """Time every variant ``rounds`` times ``reps`` calls, round-robin; one warm-up call each."""
    for fn in variants.values():
        fn()
    calls = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            calls[name] += timed_calls(fn, reps)
    return {name: summarize(c) for name, c in calls.items()}


def random_pair(out_f: int, in_f: int, n: int, m: int, seed: int):
    """A random bf16 weight pruned to n:m by magnitude -> (dense pruned bf16, bitmask, values)."""
    from atv_sparse.formats.bitmask import compress

    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(torch.bfloat16)
    groups = weight.abs().float().reshape(out_f, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    keep = keep.reshape(out_f, in_f)
    del groups
    bitmask, values = compress(weight, keep, n, m)
    return weight * keep, bitmask, values


def copies_for(nbytes: int) -> int:
    return max(1, math.ceil(L3_ROTATE_BYTES / max(nbytes, 1)))


def bench_layer(name: str, out_f: int, in_f: int, gated: bool, pattern: str, ms_list: list[int], rounds: int,
                reps: int, with_reference: bool) -> list[dict]:
    from atv_sparse.ops import cpu_lib
    from atv_sparse.ops.runner import run_backend

    n, m = (int(v) for v in pattern.split(":"))
    half = out_f // 2
    packed_bytes = out_f * in_f * n // m * 2 + out_f * -(-in_f // 8)
    dense_bytes = out_f * in_f * 2
    packs, dense_bf16, dense_fp32, reads = [], [], [], []
    for seed in range(copies_for(packed_bytes)):
        weight, bitmask, values = random_pair(out_f, in_f, n, m, seed)
        packs.append((cpu_lib.hugepage_copy(bitmask), cpu_lib.hugepage_copy(values)))
        if seed < copies_for(dense_bytes):
            dense_bf16.append(weight)
        if seed < copies_for(2 * dense_bytes):
            dense_fp32.append(weight.float())
        reads.append(cpu_lib.hugepage_copy(torch.randint(0, 256, (packed_bytes,), dtype=torch.uint8)))
        del weight
    turns = {k: itertools.cycle(v) for k, v in (("cpu", packs), ("bf16", dense_bf16), ("fp32", dense_fp32),
                                                 ("read", reads), ("reference", packs))}

    def gate(y):
        return F.silu(y[..., :half]) * y[..., half:] if gated else y

    rows = []
    for tokens in ms_list:
        x = torch.randn(tokens, in_f).to(torch.bfloat16)
        x32 = x.float()

        def sparse():
            bitmask, values = next(turns["cpu"])
            return cpu_lib.nm_linear_cpu(x, values, bitmask, n, m, None, gated)

        variants = {"cpu": sparse,
                    "torch_bf16": lambda: gate(F.linear(x, next(turns["bf16"]))),
                    "torch_fp32": lambda: gate(F.linear(x32, next(turns["fp32"]))),
                    "stream_read": lambda: cpu_lib.stream_read(next(turns["read"]))}
        big = tokens >= 128
        res = interleaved(variants, rounds=max(2, rounds // 2) if big else rounds, reps=max(2, reps // 2) if big
                          else reps)
        if with_reference and tokens == ms_list[0]:
            def reference():
                bitmask, values = next(turns["reference"])
                return run_backend("reference", x, bitmask, values, in_f, n, m, None, gated)

            res["reference"] = interleaved({"reference": reference}, rounds=1, reps=3)["reference"]
        row = {"layer": name, "out": out_f, "in": in_f, "gated": gated, "pattern": pattern, "m": tokens,
               "packed_bytes": packed_bytes, "dense_bytes": dense_bytes, "load_avg": os.getloadavg()[0], **{
                   f"{k}_{stat}": v for k, r in res.items() for stat, v in r.items()}}
        # one basis for every variant of a row: medians of unpreempted calls where each has 3 or more,
        # else medians of run time (wall minus run-queue wait)
        compared = ("cpu", "torch_bf16", "torch_fp32")
        row["basis"] = "unpreempted" if all(row[f"{k}_median_ms"] for k in compared) else "run time"
        for k in res:  # (the few slow reference calls fall back to run time on their own)
            unpreempted = row["basis"] == "unpreempted" and row[f"{k}_median_ms"] is not None
            row[f"{k}_ms"] = row[f"{k}_median_ms"] if unpreempted else row[f"{k}_run_median_ms"]
        for k in ("torch_bf16", "torch_fp32", "reference"):
            if k in res:
                row[f"speedup_vs_{k}"] = row[f"{k}_ms"] / row["cpu_ms"]
                row[f"speedup_vs_{k}_min"] = row[f"{k}_min_ms"] / row["cpu_min_ms"]
        row["cpu_gbs"] = packed_bytes / (row["cpu_min_ms"] * 1e6)
        row["stream_read_gbs"] = packed_bytes / (row["stream_read_min_ms"] * 1e6)
        row["cpu_of_stream_read"] = row["cpu_gbs"] / row["stream_read_gbs"]
        row["torch_bf16_gbs"] = dense_bytes / (row["torch_bf16_min_ms"] * 1e6)
        print(f"  {pattern} {name} M={tokens}: cpu {fmt(row['cpu_ms'])} ms, torch bf16 "
              f"{fmt(row['torch_bf16_ms'])} ms, x{fmt(row.get('speedup_vs_torch_bf16'), '.2f')} ({row['basis']}), "
              f"{row['cpu_of_stream_read']:.0%} of stream read, load {row['load_avg']:.1f}", flush=True)
        rows.append(row)
    return rows


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


# --- end to end -----------------------------------------------------------------------------------------

def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def linear_bytes(model) -> int:
    """Bytes held by the decoder linears (dense weights, or SparseLinear pairs and layouts)."""
    from atv_sparse.nn.sparse_linear import SparseLinear

    total = 0
    for block in model.layers:
        for attr in ("wqkv", "wo", "w_gate_up", "w_down"):
            mod = getattr(block, attr)
            if isinstance(mod, SparseLinear):
                total += sum(mod.resident_bytes().values())
            else:
                total += mod.weight.numel() * mod.weight.element_size()
    return total


@torch.no_grad()
def decode_steps(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], list[tuple[float, int]]]:
    """Greedy decode after ``prompt`` (1, T): the tokens and (seconds, run-queue wait ns) per step."""
    model.cache_k.zero_()
    model.cache_v.zero_()
    t = prompt.shape[1]
    tok = model(prompt, torch.arange(t))[:, -1:].argmax(-1)
    tokens, steps = [], []
    for i in range(new_tokens):
        before = run_queue_wait_ns()
        start = time.perf_counter()
        tok = model(tok, torch.tensor([t + i]))[:, -1:].argmax(-1)
        steps.append((time.perf_counter() - start, run_queue_wait_ns() - before))
        tokens.append(int(tok))
    return tokens, steps


def bench_e2e(pattern: str, new_tokens: int, repeats: int, shape_kw: dict = LLAMA32_1B) -> dict:
    from llama_decode import LlamaDecoder, LlamaShape, init_random, sparsify

    from atv_sparse.nn.prepare import prepare_model

    shape = LlamaShape(**shape_kw)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: no fp32 copy
    try:
        model = LlamaDecoder(shape, max_seq=16 + new_tokens + 8).eval()
    finally:
        torch.set_default_dtype(default)
    init_random(model)
    prompt = torch.randint(0, shape.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    result = {"shape": shape_kw, "pattern": pattern, "new_tokens": new_tokens}
    for kind in ("dense", "sparse"):
        if kind == "sparse":
            sparsify(model, pattern, backend="auto")
            summary = prepare_model(model, "auto", progress=False)
            result["sparse_plans"] = sorted(set(summary.values()))
        steps, tokens = [], None
        for _ in range(repeats):
            tokens, got = decode_steps(model, prompt, new_tokens)
            steps += got[1:]  # the first step after the prompt warms caches
        timing = summarize(steps)
        result[kind] = {"tokens_per_s_median": 1e3 / timing["median_ms"] if timing["median_ms"] else None,
                        "tokens_per_s_run_median": 1e3 / timing["run_median_ms"],
                        "tokens_per_s_best": 1e3 / timing["min_ms"], "unpreempted": timing["unpreempted"],
                        "steps": len(steps), "linear_bytes": linear_bytes(model), "rss_bytes": rss_bytes(),
                        "first_tokens": tokens[:8], "load_avg": os.getloadavg()[0]}
        print(f"  e2e {kind}: {result[kind]['tokens_per_s_run_median']:.2f} tokens/s (run time), linears "
              f"{result[kind]['linear_bytes'] / 2**30:.2f} GiB, RSS {result[kind]['rss_bytes'] / 2**30:.2f} GiB",
              flush=True)
    d, s = result["dense"], result["sparse"]
    result["basis"] = "unpreempted" if d["tokens_per_s_median"] and s["tokens_per_s_median"] else "run time"
    key = "tokens_per_s_median" if result["basis"] == "unpreempted" else "tokens_per_s_run_median"
    result["decode_speedup"] = s[key] / d[key]
    result["decode_speedup_best"] = s["tokens_per_s_best"] / d["tokens_per_s_best"]
    result["linear_bytes_ratio"] = s["linear_bytes"] / d["linear_bytes"]
    del model
    return result


# --- report ---------------------------------------------------------------------------------------------

def markdown(env: dict, rows: list[dict], e2e: list[dict], command: str) -> str:
    lines = [f"# The cpu backend against torch dense: {env['cpu']}", "",
             f"{env['date']} | {env['cores']} cores, {env['threads']} thread(s) | ISA paths {', '.join(env['paths'])} | "
             f"torch {env['torch']} | Python {env['python']} | load average at start {env['load_avg_start'][0]:.1f}", "",
             f"Reproduce: `{command}`", "",
             "Per layer, bf16. Times: median (min of all calls). The median is of unpreempted calls where every "
             "variant of the row had 3 or more (basis `unpreempted`), else of run time, wall time minus the "
             "run-queue wait (basis `run time`: this shared machine was often too loaded for unpreempted calls "
             "of several ms). x = torch time / cpu time on that basis (ratios of minima in the JSON). "
             "GB/s: compressed bytes (values + bitmask) / min time, beside a "
             "streaming read of as many bytes measured interleaved in the same run. `load` is the 1-minute load "
             "average when the row finished (the machine is shared).", "",
             "| pattern | layer (out x in) | M | cpu ms | torch bf16 ms | x bf16 | torch fp32 ms | x fp32 | reference ms "
             "| cpu GB/s | read GB/s | % of read | basis | unpreempted | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ref = f"{fmt(r.get('reference_ms'), '.1f')} ({fmt(r.get('reference_min_ms'), '.1f')})" \
            if "reference_min_ms" in r else ""
        lines.append(
            f"| {r['pattern']} | {r['layer']} {r['out']}x{r['in']} | {r['m']} | {fmt(r['cpu_ms'])} "
            f"({fmt(r['cpu_min_ms'])}) | {fmt(r['torch_bf16_ms'])} ({fmt(r['torch_bf16_min_ms'])}) | "
            f"{fmt(r.get('speedup_vs_torch_bf16'), '.2f')} | {fmt(r['torch_fp32_ms'])} | "
            f"{fmt(r.get('speedup_vs_torch_fp32'), '.2f')} | {ref} | {r['cpu_gbs']:.1f} | {r['stream_read_gbs']:.1f} | "
            f"{r['cpu_of_stream_read']:.0%} | {r['basis']} | {r['cpu_unpreempted']}/{r['cpu_calls']} | "
            f"{r['load_avg']:.1f} |")
    for e in e2e:
        d, s = e["dense"], e["sparse"]
        lines += ["", f"## End to end: greedy decode, {e['pattern']}, "
                  f"{'Llama-3.2-1B' if e['shape'] == LLAMA32_1B else 'a tiny'} shape "
                  f"({e['shape']['n_layers']} layers, dim {e['shape']['dim']}, random weights, bf16)", "",
                  f"One loop (`cpu_latency.decode_steps`), batch 1, {e['new_tokens']} tokens after a 16-token "
                  f"prompt; sparse plans: {', '.join(e.get('sparse_plans', []))}. Embeddings and the output "
                  "projection stay dense in both.", "",
                  "| | dense bf16 | packed | ratio |", "|---|---:|---:|---:|",
                  f"| tokens/s (median of unpreempted steps) | {fmt(d['tokens_per_s_median'], '.2f')} | "
                  f"{fmt(s['tokens_per_s_median'], '.2f')} | |",
                  f"| tokens/s (median run time: wall minus run-queue wait) | {d['tokens_per_s_run_median']:.2f} | "
                  f"{s['tokens_per_s_run_median']:.2f} | |",
                  f"| decode speed-up (basis: {e['basis']}) | | | {e['decode_speedup']:.2f}x |",
                  f"| tokens/s (best step) | {d['tokens_per_s_best']:.2f} | {s['tokens_per_s_best']:.2f} | "
                  f"{e['decode_speedup_best']:.2f}x |",
                  f"| decoder linears resident GiB | {d['linear_bytes'] / 2**30:.3f} | {s['linear_bytes'] / 2**30:.3f} | "
                  f"{e['linear_bytes_ratio']:.3f} |",
                  f"| process RSS GiB | {d['rss_bytes'] / 2**30:.2f} | {s['rss_bytes'] / 2**30:.2f} | |",
                  f"| unpreempted steps | {d['unpreempted']}/{d['steps']} | {s['unpreempted']}/{s['steps']} | |"]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted({r["pattern"] for r in rows})
    fig, axes = plt.subplots(1, len(patterns), figsize=(6 * len(patterns), 4.2), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        for layer in dict.fromkeys(r["layer"] for r in rows):
            pts = [(r["m"], r.get("speedup_vs_torch_bf16")) for r in rows
                   if r["pattern"] == pattern and r["layer"] == layer and r.get("speedup_vs_torch_bf16")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=layer)
        ax.axhline(16 / 9, color="k", ls="--", lw=1, label="bytes ceiling 1.78x (vs a bandwidth-bound dense)")
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per call (M)")
        ax.set_ylabel("speed-up over torch dense bf16 (medians)")
        ax.set_title(f"{pattern}, bf16, Llama-3-8B layer shapes")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args, shapes: dict, command: str) -> int:
    from atv_sparse.ops import cpu_lib

    why = cpu_lib.cpu_library_status()
    if why is not None:
        print(f"latency.py --cpu: the cpu backend is unavailable here ({why}); nothing to measure")
        return 0
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    patterns = [p.strip() for p in args.pattern.split(",") if p.strip()]
    ms_list = [int(v) for v in args.m.split(",")]
    rows, e2e = [], []
    for pattern in patterns:
        chosen = {k: v for k, v in shapes.items() if not args.layers or k in args.layers.split(",")}
        for layer, (out_f, in_f, gated) in ([] if args.skip_layers else chosen.items()):
            print(f"{pattern} {layer} {out_f}x{in_f}", flush=True)
            rows += bench_layer(layer, out_f, in_f, gated, pattern, ms_list, args.rounds, args.reps,
                                not args.no_reference)
    if args.cpu_e2e:
        for pattern in patterns:
            print(f"{pattern} end to end", flush=True)
            e2e.append(bench_e2e(pattern, args.e2e_tokens, args.e2e_repeats,
                                 TINY if args.e2e_shape == "tiny" else LLAMA32_1B))
    env["load_avg_end"] = os.getloadavg()
    text = markdown(env, rows, e2e, command)
    print(text)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cpu-" + re.sub(r"[^A-Za-z0-9]+", "-", env["cpu"]).strip("-").lower() + "-" + env["date"][:10]
    if args.tag:
        stem += f"-{args.tag}"
    for suffix, content in ((".md", text + "\n"), (".json", json.dumps(
            {"env": env, "args": vars(args), "layers": rows, "e2e": e2e}, indent=1, default=str) + "\n")):
        tmp = out_dir / f".{stem}{suffix}.tmp"
        tmp.write_text(content)
        os.replace(tmp, out_dir / f"{stem}{suffix}")
    if rows:
        plot(rows, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.md, .json" + (", .png" if rows else ""))
    return 0
