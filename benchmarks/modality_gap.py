"""Modality-gap diagnostics of a bundled tiny VLM (``atv_sparse.analysis.modality_gap``).

    python benchmarks/modality_gap.py                          # -> benchmarks/results/modality-gap-tiny.{md,json}
    python benchmarks/modality_gap.py --model tiny-next        # -> benchmarks/results/modality-gap-tiny-next.{md,json}
    python benchmarks/modality_gap.py --nsamples 8 --out /tmp/g   # a quick look

Per decoder block and linear input: the cosine between the text and visual tokens' per-channel
activation RMS profiles, their norm ratio (visual / text), and the kept-weight overlap of Wanda
masks at 50% scored from text-only vs visual-only statistics; plus the visual share of the
calibration tokens. Calibration: the default calibration conversations (``--nsamples`` per seed),
seeds 0, 1, 2 pooled; one dense forward per sample, so it takes seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Linear kinds in block order; q/k/v (and gate/up) read the same input, so cosine and ratio are
# reported once per input site, the overlap per linear.
INPUT_SITES = {"attn in (q/k/v)": "q_proj", "o_proj in": "o_proj", "mlp in (gate/up)": "gate_proj",
               "down_proj in": "down_proj"}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def measure(model_dir: Path, nsamples: int, seeds: tuple[int, ...]) -> dict:
    from atv_sparse.analysis.modality_gap import modality_gap
    from atv_sparse.calib.samples import conversation_calibration, synthetic_image_size
    from atv_sparse.models import adapter_for, read_config
    from atv_sparse.patterns import parse_pattern
    from atv_sparse.prune.targets import resolve_targets
    from atv_sparse.evaluation.loading import load_model_and_processor
    from atv_sparse.tinybench.tasks import calibration_conversations

    model, processor = load_model_and_processor(model_dir, dtype=torch.float32)
    adapter = adapter_for(read_config(model_dir), model_dir)
    prefix = adapter.layers_prefix(model)
    targets = resolve_targets(model, prefix, parse_pattern("unstructured", 0.5)).targets  # every decoder linear
    size = synthetic_image_size(processor.image_processor)  # as convert's embedded calibration draws them
    conversations = [conv for seed in seeds
                     for conv in calibration_conversations(nsamples, seed, size=size)]
    calibration = conversation_calibration(processor, conversations, model.config.image_token_id)
    gap = modality_gap(model, targets, calibration.samples, calibration.tokens)
    blocks: dict[int, dict] = {}
    for name, g in gap.items():
        index, kind = int(name[len(prefix) + 1:].split(".")[0]), name.rsplit(".", 1)[1]
        blocks.setdefault(index, {})[kind] = g
    mix = calibration.token_mix()
    return {"model": _shown(model_dir), "linears": gap, "blocks": blocks, "visual_share": mix["visual_share"],
            "visual_tokens": mix["visual"], "text_tokens": mix["text"], "samples": len(calibration.samples)}


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (results name no home directory)."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def markdown(r: dict, args) -> str:
    blocks = r["blocks"]
    lines = [f"# Modality gap of `{Path(r['model']).name}` ({datetime.date.today()})", "",
             f"Calibration: {r['samples']} default calibration conversations ({args.nsamples} per seed, seeds "
             f"{', '.join(map(str, args.seeds))}): {r['visual_tokens']:,} visual and {r['text_tokens']:,} text "
             f"tokens at every block's input, **visual share {100 * r['visual_share']:.1f}%**. "
             f"Dense forward, fp32; {args.record['cpu']}, Python {args.record['python']}, torch "
             f"{args.record['torch']}, transformers {args.record['transformers']}"
             + (f"; model record `{json.dumps(args.record['model_record'])}`" if args.record.get("model_record") else "")
             + f". Command: `{args.record['command']}`.", "",
             "cosine: text vs visual per-channel activation RMS at the linear's input (1 = same profile); "
             "ratio: ||RMS visual|| / ||RMS text||; overlap: kept weights shared by Wanda 50% masks scored from "
             "text-only and from visual-only statistics (one-shot, dense activations).", ""]
    sites = list(INPUT_SITES.items())
    lines += ["## Per block: cosine / norm ratio at each input", "",
              "| block | " + " | ".join(s for s, _ in sites) + " |",
              "| ---: | " + " | ".join("---:" for _ in sites) + " |"]
    for b in sorted(blocks):
        lines.append(f"| {b} | " + " | ".join(f"{blocks[b][k]['cosine']:.3f} / {blocks[b][k]['norm_ratio']:.2f}"
                                             for _, k in sites) + " |")
    lines += ["", "## Per block: Wanda 50% kept-weight overlap, text-only vs visual-only calibration", "",
              "| block | " + " | ".join(KINDS) + " | mean |", "| ---: | " + " | ".join("---:" for _ in KINDS) + " | ---: |"]
    for b in sorted(blocks):
        vals = [blocks[b][k]["overlap"] for k in KINDS]
        lines.append(f"| {b} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + f" | {100 * statistics.fmean(vals):.1f} |")
    all_overlap = [g["overlap"] for g in r["linears"].values()]
    all_cos = [g["cosine"] for g in r["linears"].values()]
    lines += ["", f"Over all linears: overlap {100 * min(all_overlap):.1f}-{100 * max(all_overlap):.1f}% "
              f"(mean {100 * statistics.fmean(all_overlap):.1f}%), cosine {min(all_cos):.3f}-{max(all_cos):.3f}.", ""]
    return "\n".join(lines)


def run_record(model_dir: Path, argv) -> dict:
    """Machine, versions and the reproducing command; the folder's ``atv_projector.json`` (which
    projector an assembled real-LM LLaVA holds, ``real_lm/smollm2_llava.py``) where it has one."""
    import sys

    import transformers

    from atv_sparse.tinybench.hardware import cpu_name

    projector = model_dir / "atv_projector.json"
    return {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "command": ("python benchmarks/modality_gap.py " + " ".join(sys.argv[1:] if argv is None else argv)
                        ).replace(str(Path.home()), "~"),  # results name no home directory
            **({"model_record": json.loads(projector.read_text())} if projector.is_file() else {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-vlm", help="a bundled model (tiny-vlm, tiny-next) or a model directory")
    p.add_argument("--nsamples", type=int, default=32, help="calibration conversations per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="output path without suffix (default: benchmarks/results/modality-gap-tiny for "
                   "tiny-vlm, modality-gap-tiny-next for tiny-next)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from atv_sparse.evaluation.loading import model_dir_of

    if args.out is None:
        name = {"tiny-vlm": "tiny", "tiny-next": "tiny-next"}.get(args.model, Path(args.model).name)
        args.out = str(HERE / "results" / f"modality-gap-{name}")
    args.model = str(model_dir_of(args.model))
    args.record = run_record(Path(args.model), argv)
    r = measure(Path(args.model), args.nsamples, tuple(args.seeds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(r, args)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({**r, "blocks": {str(k): v for k, v in r["blocks"].items()},
                                                    "date": str(datetime.date.today()),
                                                    **args.record}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
