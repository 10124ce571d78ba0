"""sha256 of every file ``python -m atv_sparse.convert`` writes, over the families, methods and patterns.

    python benchmarks/output_hashes.py --work DIR [--save benchmarks/results/output-hashes.txt]
    python benchmarks/output_hashes.py --work DIR --check benchmarks/results/output-hashes.txt

A refactor that claims "pruned outputs bit-identical" runs this before and after: the list must
not change. The models are the tiny checkpoints of the test suite (``tinybench.families``: LLaMA
and Qwen2 LMs, the five VLM families, random weights, fixed seeds) and the two bundled trained
VLMs (copied into DIR), each pruned by every method that applies to it (magnitude, wanda,
sparsegpt on every model; atv, atv-sparsegpt, tamp on the VLMs; tamp --das unstructured) at 2:4,
4:8 and 50% unstructured, plus, on the bundled tiny VLM, every other token selector, the paper
budget rule, --budget-from, dense output, text calibration and targets outside the blocks.
Small calibration (4 samples, 64-token text windows) keeps it to minutes on a CPU.

Safetensors files, sparsity.json and config.json are hashed as written. Two things in the JSON
files change from run to run and are taken out before hashing: DIR itself (written as ``<work>``)
and, in prune_report.json, the timings and the peak memory (keys ``time*`` and ``peak_rss_bytes``).
``--rehash`` recomputes the list from the outputs already in DIR (after a change to this script).
The inputs are hashed too, so a changed fixture shows as such rather than as a changed pruner.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import torch

PATTERNS = ("2:4", "4:8", "unstructured")
LLM_METHODS = ("magnitude", "wanda", "sparsegpt")
VLM_METHODS = LLM_METHODS + ("atv", "atv-sparsegpt", "tamp")
CALIBRATION = ["--nsamples", "4", "--seqlen", "64"]


def write_models(work: Path) -> dict[str, Path]:
    """name -> checkpoint directory under ``work`` (written once, reused when present)."""
    from atv_sparse.tinybench.families import FAMILIES, write_tiny_llm, write_tiny_vlm
    from atv_sparse.evaluation.loading import model_dir_of

    models = {}
    for seed, family in enumerate(("llama", "qwen2")):
        models[f"llm-{family}"] = work / "models" / f"llm-{family}"
        if not models[f"llm-{family}"].exists():
            write_tiny_llm(models[f"llm-{family}"], family, seed=seed)
    for family in FAMILIES:
        models[f"vlm-{family}"] = work / "models" / f"vlm-{family}"
        if not models[f"vlm-{family}"].exists():
            write_tiny_vlm(models[f"vlm-{family}"], family)
    for name in ("tiny_vlm", "tiny_next"):
        models[name] = work / "models" / name
        if not models[name].exists():
            shutil.copytree(model_dir_of(name.replace("_", "-")), models[name])
    return models


def cases(models: dict[str, Path], work: Path) -> list[tuple[str, list[str]]]:
    """(case name, convert arguments without --out), in the order they run."""
    runs = []
    for name, ckpt in models.items():
        methods = LLM_METHODS if name.startswith("llm-") else VLM_METHODS
        for method in methods:
            for pattern in PATTERNS:
                runs.append((f"{name}/{method}/{pattern}", [str(ckpt), "--method", method, "--pattern", pattern]))
        if not name.startswith("llm-"):
            runs.append((f"{name}/tamp-das/unstructured",
                         [str(ckpt), "--method", "tamp", "--das", "--pattern", "unstructured"]))
    vlm = str(models["tiny_vlm"])
    for tokens in ("text", "visual", "random", "abs", "dbs", "drift-fixed"):
        runs.append((f"tiny_vlm/wanda-{tokens}/2:4", [vlm, "--method", "wanda", "--calib-tokens", tokens]))
    runs += [
        ("tiny_vlm/sparsegpt-atv/2:4", [vlm, "--method", "sparsegpt", "--calib-tokens", "atv"]),
        ("tiny_vlm/atv-paper-alpha2/2:4", [vlm, "--method", "atv", "--alpha", "2", "--budget-rule", "paper"]),
        ("tiny_vlm/wanda-dbs-budget-from-atv/2:4",
         [vlm, "--method", "wanda", "--calib-tokens", "dbs", "--budget-from",
          str(work / "out" / "tiny_vlm_atv_2-4" / "prune_report.json")]),
        ("tiny_vlm/wanda-dense-format/2:4", [vlm, "--method", "wanda", "--format", "dense"]),
        ("tiny_vlm/wanda-text-calib/2:4", [vlm, "--method", "wanda", "--calib", str(work / "calib.txt")]),
        ("llm-llama/wanda-calib-file/4:8", [str(models["llm-llama"]), "--method", "wanda", "--pattern", "4:8",
                                            "--calib", str(work / "calib.txt")]),
    ]
    for method in ("wanda", "sparsegpt", "magnitude"):
        runs.append((f"tiny_vlm/{method}-outside-targets/2:4",
                     [vlm, "--method", method, "--targets", "re:.*layers[.]0[.].*", "linear_1", "lm_head"]))
    runs.append(("llm-qwen2/sparsegpt-lm-head/unstructured",
                 [str(models["llm-qwen2"]), "--method", "sparsegpt", "--pattern", "unstructured",
                  "--targets", "re:.*mlp.*", "lm_head"]))
    return runs


def canonical_bytes(path: Path, work: Path) -> bytes:
    """The bytes hashed for ``path``: as written, or JSON without ``work`` and without run-to-run
    measurements (timings, peak memory)."""
    data = path.read_bytes()
    if path.suffix != ".json":
        return data
    text = data.decode("utf-8").replace(str(work), "<work>")
    if path.name != "prune_report.json":
        return text.encode("utf-8")

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not k.startswith(("time", "timings")) and k != "peak_rss_bytes"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return json.dumps(strip(json.loads(text)), sort_keys=True).encode("utf-8")


def hash_dir(directory: Path, work: Path) -> list[tuple[str, str]]:
    return [(str(p.relative_to(directory)), hashlib.sha256(canonical_bytes(p, work)).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()]


def output_hashes(work: Path, only: str | None = None, rehash: bool = False) -> list[str]:
    """One line "case<TAB>file<TAB>sha256" per output file (and per input file, case "input/<model>")."""
    from atv_sparse.calib import default_calibration_text
    from atv_sparse.convert import run

    work.mkdir(parents=True, exist_ok=True)
    (work / "calib.txt").write_text(default_calibration_text()[:6000])
    models = write_models(work)
    lines = [f"input/{name}\t{f}\t{h}" for name, ckpt in models.items() for f, h in hash_dir(ckpt, work)]
    for case, argv in cases(models, work):
        if only is not None and only not in case:
            continue
        out = work / "out" / case.replace("/", "_").replace(":", "-")
        if rehash:
            lines += [f"{case}\t{f}\t{h}" for f, h in hash_dir(out, work)]
            continue
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            run(argv + CALIBRATION + ["--out", str(out), "--overwrite", "--quiet", "--device", "cpu"])
        lines += [f"{case}\t{f}\t{h}" for f, h in hash_dir(out, work)]
        print(f"{case}: {len(list(out.iterdir()))} files", file=sys.stderr, flush=True)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="directory for the models and the outputs")
    p.add_argument("--save", type=Path, help="write the list here")
    p.add_argument("--check", type=Path, help="compare with this list; exit 1 on any difference")
    p.add_argument("--rehash", action="store_true", help="hash the outputs already in --work; convert nothing")
    p.add_argument("--only", help="run only the cases whose name contains this (for debugging)")
    args = p.parse_args()
    torch.set_num_threads(1)
    import transformers

    lines = output_hashes(args.work.resolve(), args.only, args.rehash)
    header = [f"# {len(lines)} files; python benchmarks/output_hashes.py --work DIR --check THIS_FILE",
              f"# torch {torch.__version__}, transformers {transformers.__version__}"]
    if args.save:
        args.save.write_text("\n".join(header + lines) + "\n")
    if args.check:
        expected = [ln for ln in args.check.read_text().splitlines() if ln and not ln.startswith("#")
                    and (args.only is None or args.only in ln.split("\t")[0] or ln.startswith("input/"))]
        if lines != expected:
            diff = sorted(set(lines) ^ set(expected))
            print(f"{len(diff)} lines differ from {args.check}:", *diff[:40], sep="\n")
            return 1
        print(f"identical to {args.check}: {len(lines)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
