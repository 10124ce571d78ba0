"""``python -m atv_sparse.convert``: prune a checkpoint and write it compressed (or dense).

    python -m atv_sparse.convert CKPT --method wanda --pattern 2:4 --out OUT

With no CKPT it runs on the embedded default, the bundled trained tiny vision-language model
(``atv_sparse/assets/tiny_vlm``, see its model card) with the embedded calibration set (the
synthetic tasks' calibration split), writes to a new temp dir and then scores the dense and the
pruned model on a subset of the synthetic test split (``--eval-per-task``), so it needs nothing
else.

The CLI parses, builds a ``PruneRecipe`` and calls the library: ``resolve_targets`` on a
meta-device skeleton, ``load_calibration``, ``prune_model`` streaming into a ``CheckpointStream``.
Library errors name parameters; ``main`` prints them with this CLI's flags (``FLAGS``).

A run stages its output in ``.OUT.partial`` beside ``--out`` with a journal per finished block;
``--resume`` continues an interrupted run of the same arguments (``resume.py``), and
SIGINT / SIGTERM stop it at the end of a block.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..calib import (DEFAULT_CALIBRATION, DEFAULT_MULTIMODAL_CALIBRATION, check_calibration_size, is_text_file,
                    load_calibration)
from ..cli import OneLineParser, flag_names
from ..errors import AtvSparseError, with_flags
from ..formats.checkpoint import CheckpointStream, parse_size
from ..formats.safetensors_io import checkpoint_files, checkpoint_tensors
from ..formats.spec import build_quantization_config
from ..formats.staging import check_output_dir
from ..models import adapter_for, read_config
from ..patterns import parse_pattern
from ..prune.pipeline import prune_model
from ..prune.recipe import METHODS, SELECTORS, PruneRecipe, selector_names
from ..prune.selectors import BUDGET_RULES
from ..prune.targets import resolve_targets
from ..reports import peak_rss_bytes
from .estimate import estimate_conversion
from .preflight import check_device, check_output_location, check_processor, read_budget_report, require_module
from .reports import accuracy_report, method_settings, module_entry, print_dry_run, print_summary, sparsity_json
from .resume import (ConversionJournal, ConversionStopped, calibration_digest, check_same_run, find_interrupted,
                     input_identity, kept_for_resume, resumable_stage, resume_command, run_identity,
                     stop_on_signals)

NSAMPLES, SEQLEN = 128, 2048
# The embedded model is a demo that must finish in about a minute on a laptop CPU.
EMBEDDED_NSAMPLES, EMBEDDED_SEQLEN, EMBEDDED_EVAL_PER_TASK = 32, 256, 40
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Library parameters that this CLI calls otherwise (the others are their flags' dest names).
FLAGS = {"budget_target": "--budget-from", "out_dir": "--out", "rule": "--budget-rule"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m atv_sparse.convert", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", nargs="?", metavar="CKPT",
                   help="local Hugging Face model directory (safetensors); omit it to run on the embedded tiny model")
    p.add_argument("--method", choices=tuple(METHODS), default="wanda",
                   help="pruning method; atv = Wanda scores over ATV's text + block-adaptive visual tokens "
                        "(atv-sparsegpt: with SparseGPT's update); tamp = Wanda scores over TAMP's AMIA tokens "
                        "(vision-language models)")
    p.add_argument("--das", action="store_true",
                   help="TAMP only, unstructured only: layer-wise sparsities from DAS (mean sparsity unchanged)")
    p.add_argument("--pattern", default="2:4", help="2:4, 4:8, any N:M (keep N of every M input columns), or unstructured")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights removed per layer, in (0, 1); unstructured only (default 0.5)")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration data. Text models: .txt, or .jsonl with {\"text\": ...} per line. Vision-language "
                        "models: ShareGPT4V .json / .jsonl ({\"image\", \"conversations\"}) or .jsonl {\"image\", \"text\"}, "
                        "or .txt for text only. Default: an embedded text, or for vision-language models the "
                        "ShareGPT4V-style conversations of the synthetic tasks' calibration split")
    p.add_argument("--calib-tokens", choices=selector_names(), default=None,
                   help="positions feeding the statistics of Wanda / SparseGPT (vision-language models): mixed (all), "
                        "text, visual, atv, random (ATV's budget, random positions), and the paper's ablations abs "
                        "(attention), dbs (diversity), drift-fixed (one K for all blocks), each scaled to ATV's total "
                        "budget; default mixed, atv for --method atv / atv-sparsegpt")
    p.add_argument("--alpha", type=float, default=1.0, help="ATV budget scale alpha >= 0 (0 = text-only calibration)")
    p.add_argument("--budget-rule", choices=BUDGET_RULES, default="code",
                   help="ATV budget: code = min(n_img, round(min(1, alpha*s_bar)*n_text)); paper = floor, no clamp")
    p.add_argument("--budget-from", metavar="REPORT", default=None,
                   help="abs / dbs / drift-fixed: prune_report.json of an ATV run on the same data whose total "
                        "visual-token budget to match (default: the drift rule's total on a dense pass)")
    p.add_argument("--plot", action="store_true",
                   help="also draw prune_report.png: mean visual drift and visual tokens selected per block (matplotlib)")
    p.add_argument("--nsamples", type=int, default=None,
                   help=f"calibration windows (default {NSAMPLES}; {EMBEDDED_NSAMPLES} for the embedded model)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per calibration window (default {SEQLEN}; {EMBEDDED_SEQLEN} for the embedded model)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing calibration windows")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (required with CKPT; default for the embedded model: a new temp dir)")
    p.add_argument("--format", choices=("packed", "dense"), default="packed",
                   help="packed: bitmask + values with quantization_config; dense: zeros in place, plain transformers")
    p.add_argument("--targets", nargs="+", metavar="PAT", default=None,
                   help="linears to prune: names, dotted suffixes (down_proj), class names or re:REGEX "
                        "(default: every linear of the decoder blocks)")
    p.add_argument("--ignore", nargs="+", metavar="PAT", default=[], help="linears to leave dense (same syntax)")
    p.add_argument("--skip-incompatible", action="store_true",
                   help="leave layers whose in_features is not a multiple of M dense instead of failing")
    p.add_argument("--device", default=None, help="compute device for the blocks (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="dtype to load and prune in")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean diag(H)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve targets, check shapes, print the module table and estimates; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of these same arguments from its last finished block (its "
                        "staging directory .OUT.partial beside --out); without one, start as usual")
    p.add_argument("--eval-per-task", type=int, default=None, metavar="N",
                   help="vision-language models: after writing, score the dense and the pruned model on N items per "
                        "task of the synthetic test split and print both (default "
                        f"{EMBEDDED_EVAL_PER_TASK} for the embedded model, 0 = off otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# Flags that only some methods read: dest -> whether ``recipe`` uses it.
def _uses_budget(recipe: PruneRecipe) -> bool:
    spec = SELECTORS[recipe.selection.tokens] if recipe.selection is not None else None
    return spec is not None and ("alpha" in spec.records or spec.fitted_budget)


METHOD_FLAGS = {
    "calib": lambda r: r.selection is not None, "nsamples": lambda r: r.selection is not None,
    "seqlen": lambda r: r.selection is not None, "seed": lambda r: r.selection is not None,
    # the selector's own settings: alpha and the budget rule set a drift budget (ATV, random) or its
    # fitted scale's dense pass (ABS / DBS / drift-fixed)
    "alpha": lambda r: _uses_budget(r), "budget_rule": lambda r: _uses_budget(r),
    # a rule's own settings (SparseGPT's blocksize and percdamp, TAMP's das) are its dataclass fields
    "blocksize": lambda r: "blocksize" in {f.name for f in dataclasses.fields(r.rule)},
    "percdamp": lambda r: "percdamp" in {f.name for f in dataclasses.fields(r.rule)},
}


def given_flags(argv: list[str] | None) -> set[str]:
    """The dest names of the options ``argv`` sets explicitly (a default spelled out counts)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def ignored_flags_warning(recipe: PruneRecipe, given: set[str]) -> str | None:
    """One line naming the flags given that ``recipe``'s method does not read (None: there are none)."""
    flags = flag_names(build_parser())
    unused = [flags[dest] for dest, used in METHOD_FLAGS.items() if dest in given and not used(recipe)]
    if not unused:
        return None
    return f"warning: --method {recipe.method} does not use {', '.join(unused)}; they change nothing in this run"


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and convert; returns the summary printed at the end (for tests and scripts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    embedded = args.ckpt is None
    pattern = parse_pattern(args.pattern, args.sparsity)
    nsamples = args.nsamples if args.nsamples is not None else EMBEDDED_NSAMPLES if embedded else NSAMPLES
    seqlen = args.seqlen if args.seqlen is not None else EMBEDDED_SEQLEN if embedded else SEQLEN
    eval_per_task = (args.eval_per_task if args.eval_per_task is not None
                     else EMBEDDED_EVAL_PER_TASK if embedded else 0)
    if eval_per_task < 0:
        raise AtvSparseError(f"--eval-per-task must be >= 0, got {eval_per_task}")
    check_calibration_size(nsamples, seqlen)
    recipe = PruneRecipe.build(args.method, pattern, calib_tokens=args.calib_tokens, alpha=args.alpha,
                               budget_rule=args.budget_rule, seed=args.seed, das=args.das,
                               budget_target=read_budget_report(args.budget_from) if args.budget_from else None,
                               budget_source=str(Path(args.budget_from)) if args.budget_from else None,
                               blocksize=args.blocksize, percdamp=args.percdamp)
    warning = ignored_flags_warning(recipe, given_flags(argv))
    if warning:
        print(warning, file=sys.stderr)
    if args.resume and args.out is None:
        raise AtvSparseError("`resume` needs the `out_dir` of the interrupted run")
    if args.plot:
        require_module("matplotlib", "plot", "plot")
    if args.ckpt is not None and args.out is None and not args.dry_run:
        raise AtvSparseError("--out DIR is required when a checkpoint is given")
    device = _resolve_device(args.device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our per-block bars are the ones that tell the user something
    max_shard = parse_size(args.max_shard_size)
    if embedded:
        from ..tinybench.model import bundled_model_dir

        ckpt = bundled_model_dir()
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="atv-sparse-out-")) / "tiny-vlm-pruned"
    else:
        ckpt = Path(args.ckpt)
        out = Path(args.out) if args.out else None

    # Everything the run needs, checked before any weight is read or calibration pass starts: the
    # model is a skeleton whose weights stay in the shards (every header checked here); targets
    # resolve on it, then each block is read, pruned, written and freed in turn (docs/design.md 3).
    config = read_config(ckpt)
    if "quantization_config" in config:
        raise AtvSparseError(f"{ckpt}: already a compressed checkpoint ({config['quantization_config'].get('quant_method')}); "
                             "convert the dense model instead")
    adapter = adapter_for(config, ckpt)
    if eval_per_task and not adapter.multimodal:
        raise AtvSparseError(f"--eval-per-task: {ckpt} is a text-only model ({adapter.architecture}); the synthetic "
                             "tasks ask about images (use python -m atv_sparse.evaluate --ppl FILE for text)")
    tensors = checkpoint_tensors(checkpoint_files(ckpt))
    previous = None
    if out is not None:
        check_output_dir(out, args.overwrite, ckpt)
        if not args.dry_run:
            previous = find_interrupted(out, args.resume, argv)
    model, weights = adapter.open_lazy(ckpt, DTYPES[args.dtype], tensors)  # headers read once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = resolve_targets(model, adapter.layers_prefix(model), pattern, args.targets, args.ignore,
                               args.skip_incompatible)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    estimate = estimate_conversion(model, adapter, plan, tensors, pattern, device, packed=args.format == "packed",
                                   rule=recipe.rule, calibrated=recipe.selection is not None, nsamples=nsamples,
                                   seqlen=seqlen)
    if out is not None:
        check_output_location(out, estimate["output_bytes"])
    processor = None
    if adapter.multimodal and (eval_per_task or (recipe.selection is not None and not is_text_file(args.calib))):
        processor = check_processor(ckpt)
    if args.dry_run:
        print_dry_run(args.method, ckpt, adapter, plan, pattern, estimate, args.format)
        return {"dry_run": True, "targets": list(plan.targets), "skipped": plan.skipped, **estimate}

    times: dict[str, float] = {}
    calibration = None
    if recipe.selection is not None:
        from ..tinybench.tasks import calibration_conversations  # the embedded default of a vision-language model

        t0 = time.perf_counter()
        calibration = load_calibration(ckpt, adapter, path=args.calib, nsamples=nsamples, seqlen=seqlen,
                                       seed=recipe.seed, processor=processor,
                                       default_conversations=calibration_conversations)
        if len(calibration.samples) < nsamples:
            print(f"warning: {args.calib} holds {len(calibration.samples)} samples, fewer than --nsamples "
                  f"{nsamples}; using them all", file=sys.stderr)
        times["calibration data"] = time.perf_counter() - t0
    mix = calibration.token_mix() if calibration is not None else None
    default_calib = DEFAULT_MULTIMODAL_CALIBRATION if adapter.multimodal else DEFAULT_CALIBRATION
    record = {"nsamples": nsamples, "seqlen": seqlen, "calibration": args.calib or default_calib,
              "dtype": str(next(model.parameters()).dtype), "device": str(device)}
    identity = run_identity(
        recipe, calibration={"file": record["calibration"], "nsamples": nsamples if calibration else None,
                             "seqlen": seqlen if calibration else None, "sha256": calibration_digest(calibration)},
        input_=input_identity(ckpt),
        output={"format": args.format, "max_shard_size": max_shard, "targets": list(plan.targets),
                "skipped": sorted(plan.skipped), "dtype": record["dtype"], "device": record["device"],
                "atv_sparse": __version__})
    if previous is not None:
        check_same_run(previous, identity, out)
    layers, prefix = adapter.decoder_layers(model), adapter.layers_prefix(model)
    pruned: dict[str, tuple[dict, int]] = {}  # name -> (sparsity.json entry, zeros); bitmasks go to the writer
    targets = {name: model.get_submodule(name) for name in plan.targets}
    with CheckpointStream(model, out, read=weights.read, pruned=set(plan.targets),
                          patterns={name: pattern for name in plan.targets}, packed=args.format == "packed",
                          source_dir=ckpt, max_shard_size=max_shard, overwrite=args.overwrite,
                          stage=resumable_stage(out, args.overwrite, ckpt, previous),
                          resume=previous["writer"] if previous else None) as stream:
        journal = ConversionJournal(stream, identity=identity, command=resume_command(argv), layers_prefix=prefix,
                                    targets=targets, num_blocks=len(layers), pruned=pruned, previous=previous)
        if previous:
            print(f"resume: {journal.done} of {len(layers)} blocks were finished in {journal.tmp}; rebuilding "
                  "the next block's inputs from them", file=sys.stderr)

        def sink(name, linear, keep):
            pruned[name] = module_entry(linear, keep, pattern)
            stream.put(name, linear, keep)

        with kept_for_resume(journal):
            with stop_on_signals(journal):
                result = prune_model(model, layers, prefix, targets, recipe, calibration, device,
                                     progress=not args.quiet, residency=weights, sink=sink, journal=journal,
                                     prepass=journal.prepass)
            times.update({k: v for k, v in result.timings.items() if v})
            if previous:
                times["resume: rebuild block inputs"] = journal.rebuild_s
            settings = method_settings(recipe, budget=result.budget, **record)
            targets_cfg = args.targets or [f"re:{adapter.layers_prefix(model).replace('.', '[.]')}[.][0-9]+[.].*"]
            qconfig = build_quantization_config(pattern, args.method, settings, targets_cfg,
                                                list(args.ignore) + sorted(plan.skipped), __version__)
            report = {"method": args.method, "pattern": str(pattern), "sparsity": pattern.sparsity,
                      "settings": settings, "source": str(ckpt) if not embedded else "<bundled tiny VLM>",
                      "architecture": adapter.architecture, "version": __version__, "calibration_tokens": mix,
                      "blocks": result.blocks, "skipped": plan.skipped}
            if previous:
                report["resumed"] = {"blocks_done_before": journal.resumed_from,
                                     "rebuild_s": journal.rebuild_s}
            plot = f"{args.method} {pattern}: {adapter.architecture}" if args.plot else None
            written = _finish(stream, qconfig, report, sparsity_json(targets, pruned, pattern, plan.skipped), times,
                              result.blocks, plot)
    pruned_zero = sum(zeros for _, zeros in pruned.values())
    target_numel = sum(model.get_submodule(n).weight.numel() for n in pruned)
    summary = {"source": "bundled tiny VLM" if embedded else str(ckpt), "out": str(out), "method": args.method,
               "pattern": str(pattern), "format": args.format, "architecture": adapter.architecture,
               "modules_pruned": len(pruned), "modules_skipped": len(plan.skipped), "calibration_tokens": mix,
               "sparsity_targets": pruned_zero / max(target_numel, 1),
               "sparsity_model": pruned_zero / max(sum(p.numel() for p in model.parameters()), 1),
               "timings_s": dict(times), "bytes_before": sum(f.stat().st_size for f in checkpoint_files(ckpt)),
               "bytes_after": written["bytes"], "files": written["files"], "peak_rss_bytes": peak_rss_bytes()}
    print_summary(summary)
    if eval_per_task:
        summary["accuracy"] = accuracy_report(ckpt, summary["out"], eval_per_task, device, args.quiet)
    return summary


def _finish(stream: CheckpointStream, qconfig: dict, report: dict, sparsity: dict, times: dict, blocks: list,
            plot_title: str | None) -> dict:
    """sparsity.json, prune_report.json (with the write time), the plot, config; the last shard closed
    and the directory moved into place. Returns the writer's {"bytes", "files"}."""
    t0 = time.perf_counter()

    def final_report():
        times["write"] = time.perf_counter() - t0
        return {**report, "timings_s": dict(times), "peak_rss_bytes": peak_rss_bytes()}

    extra = {"sparsity.json": sparsity, "prune_report.json": final_report}
    plot_dir, extra_files = None, {}
    if plot_title is not None:
        from .plot import plot_blocks

        plot_dir = Path(tempfile.mkdtemp(prefix="atv-sparse-plot-"))
        extra_files = {"prune_report.png": plot_blocks(blocks, plot_dir / "prune_report.png", plot_title)}
    try:
        written = stream.finish(qconfig, extra, extra_files)
    finally:
        if plot_dir is not None:
            shutil.rmtree(plot_dir, ignore_errors=True)
    times["write"] = time.perf_counter() - t0
    return written


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AtvSparseError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    check_device(device)
    return device


def cli_message(error: AtvSparseError) -> str:
    """``error``'s message with each parameter it names (`` `nsamples` ``) written as this CLI's flag."""
    flags = flag_names(build_parser()) | FLAGS
    return with_flags(str(error), flags)


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except ConversionStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside the blocks (run's own handler): what is kept was said above
        print("interrupted", file=sys.stderr)
        return 130
    except AtvSparseError as e:
        print(f"error: {cli_message(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: --help, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 2
    return 0

