"""Greedy decode of real checkpoints on the CPU: packed 2:4 (``atv_sparse.load``, the ``cpu`` backend)
against the dense export of the same pruned weights (transformers), through one loop: transformers'
``generate``, batch 1, bf16.

    python benchmarks/cpu_checkpoints_e2e.py                 # both bundled tiny models (+ SmolLM2 if cached)
    python benchmarks/cpu_checkpoints_e2e.py --models tiny_vlm --rounds 2 --new-tokens 8

Models: the two bundled tiny VLMs (``atv_sparse/assets/tiny_vlm``, ``tiny_next``: their language
models, text prompts) and SmolLM2-135M-Instruct when ``benchmarks/real_lm/smollm2.py`` has cached it
(the real-LM extra). Each is pruned by ``atv_sparse.convert --method magnitude --pattern 2:4`` and
written packed and ``--format dense``. Per round: one ``generate`` of ``--new-tokens`` tokens
(``min_new_tokens`` = ``max_new_tokens``, greedy) for dense and packed alternately; tokens/s =
new tokens / wall time of that call; the run-queue wait of every thread (``/proc/self/task``) is
read around each call, so the median of unpreempted calls is reported beside the median of all.
One torch thread. Output: ``benchmarks/results/cpu-checkpoints-e2e.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
ASSETS = ROOT / "atv_sparse" / "assets"
QUIET_NS = 50_000


def smollm2_dir() -> Path | None:
    """The cached SmolLM2 safetensors checkpoint, or None (benchmarks/real_lm/smollm2.py makes it)."""
    root = Path(os.environ.get("ATV_SPARSE_CACHE") or Path.home() / ".cache" / "atv-sparse")
    d = root / "smollm2-135m-instruct"
    return d if (d / "config.json").exists() else None


def load_dense(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.bfloat16).eval()


def pruned_linear_bytes(model, names: set[str]) -> int:
    """Bytes of the modules named ``names``: the SparseLinear pair (and layouts) or the dense weight."""
    from atv_sparse.nn.sparse_linear import SparseLinear

    total = 0
    for name, mod in model.named_modules():
        if name in names:
            if isinstance(mod, SparseLinear):
                total += sum(mod.resident_bytes().values())
            else:
                total += mod.weight.numel() * mod.weight.element_size()
    return total


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, int, list[int]]:
    from cpu_latency import run_queue_wait_ns

    before = run_queue_wait_ns()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    return seconds, run_queue_wait_ns() - before, out[0, ids.shape[1]:].tolist()


def bench_model(name: str, src: Path | None, work: Path, new_tokens: int, rounds: int) -> dict:
    import atv_sparse
    from atv_sparse.nn.sparse_linear import SparseLinear

    dirs = {}
    for kind, extra in (("packed", []), ("dense", ["--format", "dense"])):
        dirs[kind] = work / f"{name}-{kind}"
        cmd = [sys.executable, "-m", "atv_sparse.convert", *([str(src)] if src else []), "--method", "magnitude",
               "--pattern", "2:4", "--out", str(dirs[kind]), "--quiet", *extra]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    packed = atv_sparse.load(dirs["packed"], device="cpu", dtype=torch.bfloat16, progress=False)
    dense = load_dense(dirs["dense"])
    names = {n for n, m in packed.named_modules() if isinstance(m, SparseLinear)}
    plans = sorted({"/".join(sorted(set(m.plan.backends))) for m in packed.modules()
                    if isinstance(m, SparseLinear) and m.plan is not None})
    largest = max(((m.out_features, m.in_features) for m in packed.modules() if isinstance(m, SparseLinear)),
                  key=lambda s: s[0] * s[1])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs["dense"])
    ids = tok("The little red square is next to the", return_tensors="pt").input_ids
    calls = {"dense": [], "packed": []}
    tokens = {}
    for kind, model in (("dense", dense), ("packed", packed)):  # warm-up
        tokens[kind] = timed_generate(model, ids, new_tokens)[2]
    for _ in range(rounds):
        for kind, model in (("dense", dense), ("packed", packed)):
            seconds, wait, got = timed_generate(model, ids, new_tokens)
            calls[kind].append((seconds, wait))
            assert got == tokens[kind], f"{name} {kind}: greedy tokens changed between calls"
    result = {"model": name, "source": str(src) if src else "embedded default", "new_tokens": new_tokens,
              "pruned_linears": len(names), "largest": f"{largest[0]}x{largest[1]}", "plans": plans, "tokens_equal": tokens["dense"] == tokens["packed"],
              "tokens": tokens}
    for kind, model in (("dense", dense), ("packed", packed)):
        c = calls[kind]
        clean = [s for s, w in c if w < QUIET_NS]
        result[kind] = {"tokens_per_s_median": new_tokens / statistics.median(s for s, _ in c),
                        "tokens_per_s_unpreempted": new_tokens / statistics.median(clean) if len(clean) >= 3 else None,
                        "tokens_per_s_best": new_tokens / min(s for s, _ in c), "unpreempted": len(clean),
                        "calls": len(c), "linear_bytes": pruned_linear_bytes(model, names)}
    result["speedup_median"] = result["packed"]["tokens_per_s_median"] / result["dense"]["tokens_per_s_median"]
    result["speedup_best"] = result["packed"]["tokens_per_s_best"] / result["dense"]["tokens_per_s_best"]
    result["linear_bytes_ratio"] = result["packed"]["linear_bytes"] / result["dense"]["linear_bytes"]
    print(f"  {name}: dense {result['dense']['tokens_per_s_median']:.1f} tok/s, packed "
          f"{result['packed']['tokens_per_s_median']:.1f} tok/s ({result['speedup_median']:.2f}x), linears "
          f"{result['linear_bytes_ratio']:.2f}x, tokens equal {result['tokens_equal']}", flush=True)
    return result


def agreement(r: dict) -> str:
    """'yes', or how many leading greedy tokens the two decodes share."""
    if r["tokens_equal"]:
        return "yes"
    d, p = r["tokens"]["dense"], r["tokens"]["packed"]
    same = next((i for i, (a, b) in enumerate(zip(d, p)) if a != b), min(len(d), len(p)))
    return f"no: the first {same} of {len(d)} equal"


def markdown(res: dict) -> str:
    e = res["env"]
    lines = ["# Greedy decode of real checkpoints on the CPU: packed 2:4 vs the dense export", "",
             f"{e['date']} | {e['cpu']} ({e['cores']} cores, shared, 1 torch thread) | torch {e['torch']} | "
             f"transformers {e['transformers']} | Python {e['python']} | load average at start "
             f"{e['load_avg_start']:.1f}, end {e['load_avg_end']:.1f}", "",
             f"Reproduce: `{res['command']}`", "",
             "Each model pruned by `atv_sparse.convert --method magnitude --pattern 2:4`, written packed and "
             "`--format dense`; packed loaded by `atv_sparse.load(device=\"cpu\", dtype=bfloat16)` (every pruned "
             "linear a SparseLinear on the plan shown), dense by transformers in bf16; both decode through "
             f"transformers' `generate` (greedy, batch 1, {res['args']['new_tokens']} new tokens after an "
             f"8-10-token prompt), alternating, {res['args']['rounds']} rounds after a warm-up. Tokens/s: new tokens / "
             "wall time of the call, median over rounds (unpreempted: calls no thread waited on a run queue, "
             "where 3 or more), and the best call. Linear bytes: the pruned linears only (embeddings, norms and "
             "the output projection are the same in both).", "",
             "| model | pruned linears (largest) | dense tok/s | packed tok/s | speed-up (median) | speed-up (best) "
             "| unpreempted dense / packed | linear bytes packed / dense | greedy tokens equal | plan |",
             "|---|---|---:|---:|---:|---:|---|---:|---|---|"]
    for r in res["models"]:
        d, p = r["dense"], r["packed"]
        lines.append(f"| {r['model']} | {r['pruned_linears']} ({r.get('largest', '')}) | {d['tokens_per_s_median']:.1f} | "
                     f"{p['tokens_per_s_median']:.1f} | {r['speedup_median']:.2f}x | {r['speedup_best']:.2f}x | "
                     f"{d['unpreempted']}/{d['calls']} / {p['unpreempted']}/{p['calls']} | "
                     f"{r['linear_bytes_ratio']:.3f} | {agreement(r)} | "
                     f"{', '.join(r['plans'])} |")
    lines += ["", "Greedy tokens can part between the two where two logits differ by a rounding: the packed "
              "layers accumulate in fp32 and round once (the cpu kernel), the dense ones use torch's bf16 GEMM.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny_vlm,tiny_next,smollm2",
                   help="comma-separated: tiny_vlm (the embedded default), tiny_next, smollm2 (if cached)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown from a result JSON")
    args = p.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(res) + "\n")
        return 0
    torch.set_num_threads(1)
    from cpu_latency import cpu_name

    command = "python benchmarks/cpu_checkpoints_e2e.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("out_dir", "render") and v != p.get_default(k))
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "load_avg_start": os.getloadavg()[0],
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    sources = {"tiny_vlm": None, "tiny_next": ASSETS / "tiny_next", "smollm2": smollm2_dir()}
    results = []
    with tempfile.TemporaryDirectory(prefix="atv-e2e-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in sources:
                print(f"cpu_checkpoints_e2e.py: unknown model {name!r} (one of {', '.join(sources)})", file=sys.stderr)
                return 2
            if name == "smollm2" and sources[name] is None:
                print("  smollm2: not cached (python benchmarks/real_lm/smollm2.py makes it); skipped", flush=True)
                continue
            print(f"{name} ...", flush=True)
            results.append(bench_model(name, sources[name], Path(tmp), args.new_tokens, args.rounds))
    env["load_avg_end"] = os.getloadavg()[0]
    res = {"env": env, "args": vars(args), "command": command, "models": results}
    text = markdown(res)
    print(text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from accuracy_render import write_atomic

    write_atomic(out / "cpu-checkpoints-e2e.md", text + "\n")
    write_atomic(out / "cpu-checkpoints-e2e.json", json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
