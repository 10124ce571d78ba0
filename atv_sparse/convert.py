"""``python -m atv_sparse.convert``: prune a checkpoint and write it compressed (or dense).

    python -m atv_sparse.convert CKPT --method wanda --pattern 2:4 --out OUT

With no CKPT it runs on the embedded default, the bundled trained tiny vision-language model
(``atv_sparse/assets/tiny_vlm``, see its model card) with the embedded calibration set (the
synthetic tasks' calibration split), writes to a new temp dir and then scores the dense and the
pruned model on a subset of the synthetic test split (``--eval-per-task``), so it needs nothing
else.
"""

from __future__ import annotations

import argparse
import shutil
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import __version__
from .calib import DEFAULT_CALIBRATION, default_calibration_text, read_calibration_text, text_windows
from .errors import AtvSparseError
from .formats.bitmask import unpack_bitmask
from .formats.bitmask import packed_nbytes
from .formats.checkpoint import CheckpointStream, parse_size
from .formats.staging import CLI_OUTPUT_FLAGS, check_output_dir
from .formats.safetensors_io import checkpoint_files, checkpoint_tensors
from .formats.spec import build_quantization_config
from .models import adapter_for, read_config
from .patterns import check_sparsity, parse_pattern
from .preflight import check_device, check_output_location, check_processor, read_budget_report, require_module
from .prune.pipeline import ABLATION_TOKENS, prune_model
from .prune.selectors import BUDGET_RULES, CALIB_TOKENS, SampleTokens
from .prune.targets import resolve_targets

NSAMPLES, SEQLEN = 128, 2048
# The embedded model is a demo that must finish in about a minute on a laptop CPU.
EMBEDDED_NSAMPLES, EMBEDDED_SEQLEN, EMBEDDED_EVAL_PER_TASK = 32, 256, 40
# CLI method -> (score / update rule run by the driver, default token selector).
METHODS = {"magnitude": ("magnitude", None), "wanda": ("wanda", "mixed"), "sparsegpt": ("sparsegpt", "mixed"),
           "atv": ("wanda", "atv"), "tamp": ("tamp", "tamp")}
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m atv_sparse.convert", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", nargs="?", metavar="CKPT",
                   help="local Hugging Face model directory (safetensors); omit it to run on the embedded tiny model")
    p.add_argument("--method", choices=tuple(METHODS), default="wanda",
                   help="pruning method; atv = Wanda scores over ATV's text + block-adaptive visual tokens; "
                        "tamp = Wanda scores over TAMP's AMIA tokens (vision-language models)")
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
    p.add_argument("--calib-tokens", choices=CALIB_TOKENS, default=None,
                   help="positions feeding the statistics of Wanda / SparseGPT (vision-language models): mixed (all), "
                        "text, visual, atv, random (ATV's budget, random positions), and the paper's ablations abs "
                        "(attention), dbs (diversity), drift-fixed (one K for all blocks), each scaled to ATV's total "
                        "budget; default mixed, atv for --method atv")
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
    p.add_argument("--eval-per-task", type=int, default=None, metavar="N",
                   help="vision-language models: after writing, score the dense and the pruned model on N items per "
                        "task of the synthetic test split and print both (default "
                        f"{EMBEDDED_EVAL_PER_TASK} for the embedded model, 0 = off otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000


def _check_args(args) -> None:
    embedded = args.ckpt is None
    if args.nsamples is None:
        args.nsamples = EMBEDDED_NSAMPLES if embedded else NSAMPLES
    if args.seqlen is None:
        args.seqlen = EMBEDDED_SEQLEN if embedded else SEQLEN
    if args.eval_per_task is None:
        args.eval_per_task = EMBEDDED_EVAL_PER_TASK if embedded else 0
    if args.eval_per_task < 0:
        raise AtvSparseError(f"--eval-per-task must be >= 0, got {args.eval_per_task}")
    if args.sparsity is not None:
        check_sparsity(args.sparsity)
    if args.nsamples < 1:
        raise AtvSparseError(f"--nsamples must be at least 1, got {args.nsamples}")
    if args.seqlen < 1:
        raise AtvSparseError(f"--seqlen must be at least 1, got {args.seqlen}")
    if args.blocksize < 1:
        raise AtvSparseError(f"--blocksize must be at least 1, got {args.blocksize}")
    if not 0 <= args.percdamp:
        raise AtvSparseError(f"--percdamp must be >= 0, got {args.percdamp}")
    if args.alpha < 0:
        raise AtvSparseError(f"--alpha must be >= 0, got {args.alpha}")
    score_method, default_tokens = METHODS[args.method]
    if args.calib_tokens is not None:
        if score_method == "magnitude":
            raise AtvSparseError("--calib-tokens does not apply to --method magnitude (it uses no calibration data)")
        if args.method in ("atv", "tamp") and args.calib_tokens != args.method:
            raise AtvSparseError(f"--method {args.method} selects tokens itself; use --method wanda "
                                 f"--calib-tokens {args.calib_tokens} instead")
    if args.das and (args.method != "tamp" or args.pattern.strip().lower() != "unstructured"):
        raise AtvSparseError("--das applies to --method tamp with --pattern unstructured only")
    args.score_method, args.tokens = score_method, args.calib_tokens or default_tokens
    if args.budget_from and args.tokens not in ABLATION_TOKENS:
        raise AtvSparseError(f"--budget-from applies to --calib-tokens {'/'.join(ABLATION_TOKENS)} only")
    if args.plot:
        require_module("matplotlib", "plot", "--plot")
    if args.ckpt is not None and args.out is None and not args.dry_run:
        raise AtvSparseError("--out DIR is required when a checkpoint is given")


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AtvSparseError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    check_device(device)
    return device


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and convert; returns the summary printed at the end (for tests and scripts)."""
    args = build_parser().parse_args(argv)
    pattern = parse_pattern(args.pattern, args.sparsity)
    _check_args(args)
    device = _resolve_device(args.device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our per-block bars are the ones that tell the user something
    max_shard = parse_size(args.max_shard_size)
    times: dict[str, float] = {}
    embedded = args.ckpt is None
    if embedded:
        from .tinybench.model import bundled_model_dir

        ckpt = bundled_model_dir()
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="atv-sparse-out-")) / "tiny-vlm-pruned"
    else:
        ckpt = Path(args.ckpt)
        out = Path(args.out) if args.out else None
    summary = _convert(args, ckpt, out, pattern, device, max_shard, times, embedded=embedded)
    if args.eval_per_task and not args.dry_run:
        summary["accuracy"] = _accuracy_report(ckpt, summary["out"], args.eval_per_task, device, args.quiet)
    return summary


def _convert(args, ckpt: Path, out: Path | None, pattern, device, max_shard, times, embedded: bool) -> dict:
    config = read_config(ckpt)
    if "quantization_config" in config:
        raise AtvSparseError(f"{ckpt}: already a compressed checkpoint ({config['quantization_config'].get('quant_method')}); "
                             "convert the dense model instead")
    adapter = adapter_for(config, ckpt)
    if args.eval_per_task and not adapter.multimodal:
        raise AtvSparseError(f"--eval-per-task: {ckpt} is a text-only model ({adapter.architecture}); the synthetic "
                             "tasks ask about images (use python -m atv_sparse.evaluate --ppl FILE for text)")
    tensors = checkpoint_tensors(checkpoint_files(ckpt))
    if out is not None:
        check_output_dir(out, args.overwrite, ckpt, CLI_OUTPUT_FLAGS)
    dtype = DTYPES[args.dtype]

    # The model is a skeleton whose weights stay in the shards (every header checked here): targets
    # resolve on it, then each block is read, pruned, written and freed in turn (docs/design.md 3).
    model, weights = adapter.open_lazy(ckpt, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = resolve_targets(model, adapter.layers_prefix(model), pattern, args.targets, args.ignore,
                               args.skip_incompatible)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    estimate = _estimate(args, model, adapter, plan, tensors, pattern, device)
    # Everything the run needs, checked before any weight is read or calibration pass starts.
    if out is not None:
        check_output_location(out, estimate["output_bytes"])
    budget_target = read_budget_report(args.budget_from) if args.budget_from else None
    processor = None
    if adapter.multimodal and (args.eval_per_task or (args.tokens is not None and not _text_calibration(args))):
        processor = check_processor(ckpt)
    if args.dry_run:
        _print_dry_run(args, ckpt, adapter, plan, pattern, estimate)
        return {"dry_run": True, "targets": list(plan.targets), "skipped": plan.skipped, **estimate}

    samples, tokens = None, None
    if args.tokens is not None:
        t0 = time.perf_counter()
        samples, tokens = _calibration_samples(args, ckpt, adapter, processor)
        times["calibration data"] = time.perf_counter() - t0
    budget_source = str(Path(args.budget_from)) if args.budget_from else None

    layers = adapter.decoder_layers(model)
    targets = {name: model.get_submodule(name) for name in plan.targets}
    with CheckpointStream(model, out, read=weights.read, pruned=set(targets),
                          patterns={name: pattern for name in targets}, packed=args.format == "packed",
                          source_dir=ckpt, max_shard_size=max_shard, overwrite=args.overwrite) as stream:
        pruned: dict[str, tuple[dict, int]] = {}  # name -> (sparsity.json entry, zeros); bitmasks go to the writer

        def sink(name, linear, bitmask):
            pruned[name] = _module_entry(linear, bitmask, pattern)
            stream.put(name, linear, bitmask)

        result, settings_budget, extra_times = prune_model(
            model, layers, adapter.layers_prefix(model), targets, args.score_method, pattern, samples, tokens,
            device, calib_tokens=args.tokens, alpha=args.alpha, budget_rule=args.budget_rule, seed=args.seed,
            das=args.das, budget_target=budget_target, budget_source=budget_source, blocksize=args.blocksize,
            percdamp=args.percdamp, progress=not args.quiet, residency=weights, sink=sink)
        times.update(extra_times)
        times.update({k: v for k, v in result.timings.items() if v})
        written = _finish(args, ckpt, adapter, plan, model, targets, pruned, result, pattern, device,
                          settings_budget, times, embedded, stream)
    summary = _summary(args, ckpt, out, adapter, plan, model, pruned, pattern, written, times, embedded)
    _print_summary(summary)
    return summary


def peak_rss_bytes() -> int:
    """The largest resident set this process has had so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _finish(args, ckpt, adapter, plan, model, targets, pruned, result, pattern, device, settings_budget, times,
            embedded, stream) -> dict:
    """sparsity.json, prune_report.json, config; the last shard closed and the directory moved into place."""
    sparsity_json = _sparsity_json(targets, pruned, pattern, plan.skipped)
    default_calib = "<synthetic tasks, calibration split>" if adapter.multimodal else DEFAULT_CALIBRATION
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                "calibration": args.calib or default_calib, "dtype": str(next(model.parameters()).dtype),
                "device": str(device), "calib_tokens": args.tokens}
    if args.tokens in ("atv", "random"):
        settings.update(alpha=args.alpha, budget_rule=args.budget_rule)
    if args.das:
        settings.update(das=True)
    settings.update(settings_budget)
    if args.score_method == "sparsegpt":
        settings.update(blocksize=args.blocksize, percdamp=args.percdamp)
    if args.score_method == "magnitude":
        settings = {"dtype": settings["dtype"], "device": settings["device"]}
    targets_cfg = args.targets or [f"re:{adapter.layers_prefix(model).replace('.', '[.]')}[.][0-9]+[.].*"]
    qconfig = build_quantization_config(pattern, args.method, settings, targets_cfg,
                                        list(args.ignore) + sorted(plan.skipped), __version__)
    report = {"method": args.method, "pattern": str(pattern), "sparsity": pattern.sparsity, "settings": settings,
              "source": str(ckpt) if not embedded else "<bundled tiny VLM>", "architecture": adapter.architecture,
              "version": __version__, "blocks": result.blocks,
              "skipped": plan.skipped}
    t0 = time.perf_counter()

    def final_report():
        times["write"] = time.perf_counter() - t0
        return {**report, "timings_s": dict(times), "peak_rss_bytes": peak_rss_bytes()}

    extra = {"sparsity.json": sparsity_json, "prune_report.json": final_report}
    if args.plot:
        from .plot import plot_blocks

        plot_dir = Path(tempfile.mkdtemp(prefix="atv-sparse-plot-"))
        extra_files = {"prune_report.png": plot_blocks(result.blocks, plot_dir / "prune_report.png",
                                                       f"{args.method} {pattern}: {adapter.architecture}")}
    else:
        plot_dir, extra_files = None, {}
    try:
        written = stream.finish(qconfig, extra, extra_files)
    finally:
        if plot_dir is not None:
            shutil.rmtree(plot_dir, ignore_errors=True)
    times["write"] = time.perf_counter() - t0
    return written


def _text_calibration(args) -> bool:
    """A vision-language model calibrated on a plain text file (no images)."""
    return (args.calib or "").endswith(".txt")


def _calibration_samples(args, ckpt: Path, adapter, processor) -> tuple[list[dict], list[SampleTokens] | None]:
    """Model inputs per calibration sample, and (vision-language models) their visual / text positions."""
    if adapter.multimodal and not _text_calibration(args):
        return _multimodal_samples(args, ckpt, adapter, processor)
    from transformers import AutoTokenizer

    text = read_calibration_text(args.calib) if args.calib else default_calibration_text()
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError) as e:
        raise AtvSparseError(f"{ckpt}: cannot load its tokenizer ({str(e).splitlines()[0]}); copy the tokenizer "
                             "files into the checkpoint directory") from None
    windows = text_windows(tokenizer, text, args.nsamples, args.seqlen, args.seed, args.calib or DEFAULT_CALIBRATION)
    samples = [{"input_ids": ids} for ids in windows]
    if not adapter.multimodal:
        return samples, None
    return samples, [SampleTokens.from_inputs(s["input_ids"], None, None) for s in samples]


def _multimodal_samples(args, ckpt: Path, adapter, processor):
    """Conversations (a file, or the embedded synthetic set) through the checkpoint's own processor."""
    from transformers import AutoConfig

    from .calib.multimodal import build_sample, read_multimodal_file
    from .tinybench.tasks import calibration_conversations

    image_token_id = adapter.image_token_id(AutoConfig.from_pretrained(ckpt))
    token = getattr(processor, "image_token", None)
    processor_id = getattr(processor, "image_token_id", None)
    if processor_id is None and token is not None:
        processor_id = processor.tokenizer.convert_tokens_to_ids(token)
    if processor_id is not None and processor_id != image_token_id:
        raise AtvSparseError(f"{ckpt / 'config.json'}: image token id {image_token_id} is not the processor's image "
                             f"token {token!r} (id {processor_id}); set image_token_id in config.json")
    if args.calib:
        conversations = read_multimodal_file(args.calib, limit=args.nsamples)
        if len(conversations) < args.nsamples:
            print(f"warning: {args.calib} holds {len(conversations)} samples, fewer than --nsamples "
                  f"{args.nsamples}; using them all", file=sys.stderr)
    else:
        conversations = calibration_conversations(args.nsamples, seed=args.seed)
    samples = [build_sample(processor, conv, image_token_id) for conv in conversations]
    tokens = [SampleTokens.from_inputs(s["input_ids"], s.get("attention_mask"), image_token_id) for s in samples]
    return samples, tokens


def _module_entry(linear, bitmask, pattern) -> tuple[dict, int]:
    """sparsity.json's entry for one pruned linear, and its number of zeros (from its keep-mask)."""
    keep = unpack_bitmask(bitmask, linear.in_features)
    entry = {"shape": [linear.out_features, linear.in_features], "pattern": str(pattern),
             "sparsity": 1 - keep.sum().item() / keep.numel()}
    if pattern.is_nm:
        groups = keep.reshape(keep.shape[0], -1, pattern.m).sum(-1)
        entry["pattern_check"] = "ok" if bool((groups == pattern.n).all()) else "FAILED"
    else:
        entry["pattern_check"] = "n/a (unstructured)"
    return entry, keep.logical_not().sum().item()


def _sparsity_json(targets, pruned, pattern, skipped) -> dict:
    modules = {name: pruned[name][0] for name in targets}
    for name, why in skipped.items():
        modules[name] = {"pattern": "dense", "sparsity": 0.0, "pattern_check": f"skipped: {why}"}
    return {"pattern": str(pattern), "modules": modules}


# Resident memory of the Python process with torch and transformers imported, before any weight.
RUNTIME_BYTES = 600 * 10**6


def _estimate(args, skeleton, adapter, plan, tensors, pattern, device) -> dict:
    """Output bytes and the streamed run's peak memory, from shapes alone.

    Memory follows one phase at a time: the capture (everything outside the blocks but the output
    head, plus the cached activations), one block (its weights, its statistics: fp32 vectors for
    Wanda, fp32 Hessians and SparseGPT's working copies, the activations, its packed output until
    written), and the output head when it is a target. Statistics and activations count on the
    host when the compute device is the CPU.
    """
    element = next(skeleton.parameters()).element_size()
    src_bytes = sum(math.prod(info["shape"]) * _element_size(info["dtype"]) for _, info in tensors.values())
    model_bytes = sum(p.numel() * element for p in skeleton.parameters())

    def packed_delta(lin) -> int:
        kept = lin.out_features * (lin.in_features - int(lin.in_features * pattern.sparsity))
        return packed_nbytes(lin.out_features, lin.in_features, kept, element) - lin.weight.numel() * element

    out_bytes = model_bytes + (sum(packed_delta(lin) for lin in plan.targets.values()) if args.format == "packed" else 0)
    layers = adapter.decoder_layers(skeleton)
    block_bytes = max(sum(p.numel() * element for p in block.parameters()) for block in layers)
    hidden = skeleton.config.get_text_config().hidden_size
    acts = 2 * args.nsamples * args.seqlen * hidden * element if args.tokens is not None else 0  # inputs + outputs
    prefix = adapter.layers_prefix(skeleton) + ".0."
    block0 = [lin for name, lin in plan.targets.items() if name.startswith(prefix)] or list(plan.targets.values())
    if args.score_method == "sparsegpt":
        # Every linear's Hessian at once, then one linear's H copy, its inverse factor and fp32 weights.
        stats = sum(lin.in_features ** 2 * 4 for lin in block0)
        stats += max(2 * lin.in_features ** 2 * 4 + 2 * lin.weight.numel() * 4 for lin in block0)
    elif args.score_method in ("wanda", "tamp"):  # fp32 vectors, then one linear's fp32 scores
        stats = sum(lin.in_features * 4 for lin in block0) + max(lin.weight.numel() * 4 for lin in block0)
    else:
        stats = max(lin.weight.numel() * 4 for lin in block0)
    on_host = device.type == "cpu"
    head = skeleton.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    tied = head is not None and any(id(p) in head_params for p in skeleton.get_input_embeddings().parameters())
    block_params = {id(p) for block in layers for p in block.parameters()}
    outside = sum(p.numel() * element for p in skeleton.parameters()
                  if id(p) not in block_params and (tied or id(p) not in head_params))
    phases = {"capture": outside + acts,
              "block": block_bytes + (stats + acts if on_host else 0) + block_bytes}  # + its output until written
    if any(lin is head for lin in plan.targets.values()):
        phases["output head"] = sum(p.numel() * element for p in head.parameters()) + acts
    phase = max(phases, key=phases.get)
    return {"input_bytes": src_bytes, "output_bytes": out_bytes, "runtime_bytes": RUNTIME_BYTES,
            "peak_host_bytes": RUNTIME_BYTES + phases[phase], "peak_phase": phase, "peak_block_bytes": block_bytes,
            "peak_device_bytes": block_bytes + stats, "activation_bytes": acts}


def _element_size(st_dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(st_dtype, 1)


def _print_dry_run(args, ckpt, adapter, plan, pattern, est) -> None:
    width = max(len(n) for n in list(plan.targets) + list(plan.skipped))
    print(f"dry run: {args.method} {pattern} on {ckpt} ({adapter.architecture}); nothing is written")
    print(f"{'module':<{width}}  {'shape (out x in)':>18}  action")
    for name, lin in plan.targets.items():
        print(f"{name:<{width}}  {lin.out_features:>8} x {lin.in_features:<7}  prune {pattern}")
    for name, why in plan.skipped.items():
        print(f"{name:<{width}}  {'':>18}  dense ({why})")
    print(f"targets: {len(plan.targets)} pruned, {len(plan.skipped)} skipped")
    print(f"estimated output ({args.format}): {_human(est['output_bytes'])} (input {_human(est['input_bytes'])})")
    print(f"estimated peak memory: host {_human(est['peak_host_bytes'])} (runtime {_human(est['runtime_bytes'])} + "
          f"the {est['peak_phase']} phase; one block holds {_human(est['peak_block_bytes'])}, calibration "
          f"activations {_human(est['activation_bytes'])}), device {_human(est['peak_device_bytes'])} "
          "(one block + its statistics)")


def _summary(args, ckpt, out, adapter, plan, model, pruned, pattern, written, times, embedded) -> dict:
    pruned_zero = sum(zeros for _, zeros in pruned.values())
    target_numel = sum(model.get_submodule(n).weight.numel() for n in pruned)
    total_numel = sum(p.numel() for p in model.parameters())
    src_bytes = sum(f.stat().st_size for f in checkpoint_files(ckpt))
    return {"source": "bundled tiny VLM" if embedded else str(ckpt), "out": str(out), "method": args.method,
            "pattern": str(pattern), "format": args.format,
            "architecture": adapter.architecture, "modules_pruned": len(pruned),
            "modules_skipped": len(plan.skipped), "sparsity_targets": pruned_zero / max(target_numel, 1),
            "sparsity_model": pruned_zero / max(total_numel, 1), "timings_s": dict(times),
            "bytes_before": src_bytes, "bytes_after": written["bytes"], "files": written["files"],
            "peak_rss_bytes": peak_rss_bytes()}


def _print_summary(s: dict) -> None:
    timing = " | ".join(f"{k} {v:.2f} s" for k, v in s["timings_s"].items())
    print(f"atv_sparse.convert: {s['method']} {s['pattern']} on {s['source']} ({s['architecture']})")
    print(f"  modules pruned : {s['modules_pruned']}" + (f" ({s['modules_skipped']} left dense)" if s["modules_skipped"] else ""))
    print(f"  sparsity       : {100 * s['sparsity_targets']:.2f}% of pruned layers, {100 * s['sparsity_model']:.2f}% of all weights")
    print(f"  time           : {timing}")
    print(f"  weights        : {_human(s['bytes_before'])} -> {_human(s['bytes_after'])} "
          f"({s['bytes_after'] / max(s['bytes_before'], 1):.2f}x, {s['format']})")
    print(f"  peak memory    : {_human(s['peak_rss_bytes'])} resident "
          f"({s['peak_rss_bytes'] / max(s['bytes_before'], 1):.2f}x the input checkpoint)")
    print(f"  output         : {s['out']}")


def _accuracy_report(ckpt: Path, out: str, per_task: int, device, quiet: bool) -> dict:
    """Dense (``ckpt``) vs pruned (``out``) accuracy on ``per_task`` synthetic test items per task,
    printed as a table; returns {"per_task", "dense", "pruned", "average_retention", "tasks"}."""
    from .tinybench.items import synthetic_items
    from .tinybench.loading import load_model_and_processor
    from .tinybench.metrics import compare
    from .tinybench.scoring import evaluate_model, prepare_items

    t0 = time.perf_counter()
    items = synthetic_items(per_task, seed=0)
    model, processor = load_model_and_processor(ckpt, device=str(device))
    prepared = prepare_items(model, processor, items)  # the output has the same processor files
    dense = evaluate_model(model, processor, prepared, progress=not quiet)
    del model  # one model in memory at a time
    model, _ = load_model_and_processor(Path(out), device=str(device))
    result = compare(evaluate_model(model, processor, prepared, progress=not quiet), dense)
    print(f"  accuracy       : synthetic test split, {per_task} items per task, teacher-forced exact match "
          f"({time.perf_counter() - t0:.1f} s)")
    width = max(len(t) for t in result["tasks"])
    print(f"    {'task':<{width}}  dense  pruned  retention")
    for task, s in result["tasks"].items():
        ret = "-" if s["retention"] is None else f"{s['retention']:.1f}%"
        print(f"    {task:<{width}}  {100 * s['baseline_accuracy']:5.1f}  {100 * s['accuracy']:6.1f}  {ret:>9}")
    ret = result["average_retention"]
    print(f"    {'average':<{width}}  {100 * result['baseline_average']:5.1f}  {100 * result['average']:6.1f}  "
          f"{'-' if ret is None else f'{ret:.1f}%':>9}")
    return {"per_task": per_task, "dense": result["baseline_average"], "pruned": result["average"],
            "average_retention": ret,
            "tasks": {t: {k: s[k] for k in ("baseline_accuracy", "accuracy", "retention")}
                      for t, s in result["tasks"].items()}}


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except AtvSparseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: --help, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
