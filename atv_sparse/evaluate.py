"""``python -m atv_sparse.evaluate``: accuracy of a (pruned) vision-language model on short-answer tasks.

    python -m atv_sparse.evaluate                         # the bundled tiny VLM, synthetic test split
    python -m atv_sparse.evaluate OUT --baseline DENSE    # + retention against the dense model
    python -m atv_sparse.evaluate OUT --data qa.jsonl     # your {image, question, answer} lines
    python -m atv_sparse.evaluate OUT --ppl held_out.txt  # text perplexity (any model)

Items: the synthetic test split of :mod:`atv_sparse.tinybench.tasks` (``--per-task`` items per
task, ``--seed``), or a JSONL file of ``{"image": "img/1.png", "question": ..., "answer": ...}``
(optional ``"task"`` to group the scores; ``image`` null or absent for a text-only question;
image paths relative to the file).

Scoring, per item: the question goes through the checkpoint's own chat template and processor;
the reference answer is the assistant turn that follows. ``teacher-forced`` (default): the item
is correct when every token of the reference answer and its end-of-turn token is the argmax of
the model's prediction given the prompt and the reference tokens before it, which is exactly
"greedy decoding would write the answer and stop"; one forward pass per item instead of one per
token. ``generate``: greedy decoding, then exact match after :func:`atv_sparse.evaluation.metrics.normalize_answer`. Both
report the answer NLL (the sum of -log p over the answer and end-of-turn tokens), a continuous
second metric.

``--choices`` (teacher-forced only) adds closed-choice accuracy from the same forward pass
(:mod:`atv_sparse.evaluation.choices`): the item is correct when the reference answer's first token
has the highest logit among the first tokens of its task's candidate answers (synthetic: every
answer the task can have; ``--data``: the task's distinct answers in the file), the way
lm-evaluation-harness scores multiple choice. It still ranks a weak or heavily pruned model whose
exact match is 0; tasks whose candidates share a first token or number over 32 are left out.

Per task: accuracy, mean answer NLL, items and *distinct* items (a task that repeats a few items
has fewer independent samples than items). The average is the unweighted mean over tasks.
With ``--baseline``: retention per task = 100 * accuracy / baseline accuracy, and the average
retention is the unweighted mean of the per-task retentions (the "Average" column of the ATV
paper's tables, where the dense model is 100%); tasks where the baseline scores 0 are left out
of it. Paired difference and its standard error (same items) are reported too.

The pieces live in :mod:`atv_sparse.evaluation`, which this command owns: ``items`` (what is
scored), ``scoring`` and ``choices`` (how), ``metrics`` (the scores), ``perplexity`` and ``loading``; this module
is the command line. It checks every argument and reads every input file before a model loads;
``--json OUT`` is written under a temporary name renamed when complete, and an existing OUT is
replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .cli import OneLineParser
from .errors import AtvSparseError
from .textfiles import read_user_text
from .evaluation.choices import synthetic_vocabulary
from .evaluation.items import limit_items, read_eval_file, scene_size, synthetic_items
from .evaluation.loading import is_multimodal, load_model_and_processor
from .evaluation.metrics import compare
from .models.adapter import read_config
from .tinybench.model import bundled_model_dir
from .evaluation.perplexity import text_perplexity
from .evaluation.scoring import SCORERS, evaluate_model, prepare_items
from .tinybench.tasks import TASKS, describe_tasks

DEFAULT_PER_TASK = 500
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m atv_sparse.evaluate", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                   help="dense, dense-with-zeros or compressed checkpoint (default: the bundled tiny VLM)")
    p.add_argument("--data", metavar="FILE", help='JSONL of {"image", "question", "answer"[, "task"]} '
                                                  "(default: the synthetic test split)")
    p.add_argument("--per-task", type=int, default=None,
                   help=f"items per task (synthetic: generated, default {DEFAULT_PER_TASK}; --data: the first N, "
                        "default all)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items in total")
    p.add_argument("--tasks", nargs="+", default=None, help="synthetic tasks to run (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic test items")
    p.add_argument("--baseline", metavar="DENSE_DIR", help="also score this model and report retention against it")
    p.add_argument("--ppl", metavar="FILE", help="also (or, for a text-only model, only) the perplexity of this text")
    p.add_argument("--seqlen", type=int, default=256,
                   help="perplexity window in tokens; the trailing tokens that do not fill one are dropped (Wanda)")
    p.add_argument("--no-tasks", action="store_true", help="skip the question answering (with --ppl)")
    p.add_argument("--scorer", choices=SCORERS, default="teacher-forced",
                   help="teacher-forced exact match over answer + end-of-turn (one forward pass), or greedy decoding")
    p.add_argument("--choices", action="store_true",
                   help="also closed-choice accuracy: the reference answer ranked first among its task's candidate "
                        "answers (teacher-forced only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="dtype to run in (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="OUT", help="write the scores (and per-item records) as JSON to OUT")
    p.add_argument("--overwrite", action="store_true", help="replace --json OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _format_table(result: dict, describe: dict[str, str]) -> str:
    baseline = "average_retention" in result
    choices = "average_choice" in result
    head = ["task", "mirrors", "n", "distinct", "accuracy", "answer NLL"] + (["choice"] if choices else [])
    if baseline:
        head += ["baseline", "retention", "delta (SE)"]
    rows = [head]
    for task, s in result["tasks"].items():
        row = [task, describe.get(task, ""), str(s["n"]), str(s["distinct"]), f"{100 * s['accuracy']:.1f}",
               f"{s['nll']:.3f}"] + ([f"{100 * s['choice_accuracy']:.1f}" if "choice_accuracy" in s else "-"]
                                     if choices else [])
        if baseline:
            ret = "-" if s["retention"] is None else f"{s['retention']:.1f}%"
            row += [f"{100 * s['baseline_accuracy']:.1f}", ret, f"{s['delta']:+.1f} ({s['delta_se']:.1f})"]
        rows.append(row)
    avg = ["average", "", str(sum(s["n"] for s in result["tasks"].values())), "", f"{100 * result['average']:.1f}",
           f"{result['average_nll']:.3f}"] + ([f"{100 * result['average_choice']:.1f}"] if choices else [])
    if baseline:
        ret = result["average_retention"]
        avg += [f"{100 * result['baseline_average']:.1f}", "-" if ret is None else f"{ret:.1f}%", ""]
    rows.append(avg)
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AtvSparseError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AtvSparseError(f"--device {name}: CUDA is not available on this machine")
    return str(device)


def run(args) -> dict:
    model_dir = Path(args.model_dir) if args.model_dir else bundled_model_dir()
    device, dtype = _device(args.device), DTYPES[args.dtype]
    for name in ("per_task", "limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AtvSparseError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    # Every argument is checked and the input files read (and refused) before a model loads.
    if args.choices and args.scorer != "teacher-forced":
        raise AtvSparseError("--choices ranks the answers from the teacher-forced pass; it cannot be combined with "
                             "--scorer generate")
    if args.tasks:
        unknown = [t for t in args.tasks if t not in TASKS]
        if unknown:
            raise AtvSparseError(f"--tasks: unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    if args.json:
        out = Path(args.json)
        if out.is_dir() or (out.exists() and not args.overwrite):
            raise AtvSparseError(f"--json {out}: " + ("is a directory" if out.is_dir() else
                                                      "exists; pass --overwrite to replace it"))
        if not out.parent.is_dir():
            raise AtvSparseError(f"--json {out}: the folder {out.parent} does not exist")
    if args.baseline:
        read_config(Path(args.baseline))  # refuses a folder that is not a model before the first one loads
    text = read_user_text(args.ppl, "perplexity file", allow_empty=False) if args.ppl else None
    data_items = read_eval_file(args.data) if args.data and not args.no_tasks else None
    model, processor = load_model_and_processor(model_dir, dtype=dtype, device=device)
    report: dict = {"model": str(model_dir), "device": device, "scorer": args.scorer}
    if args.ppl:
        report["ppl"] = {"file": args.ppl, **text_perplexity(model, processor, text, args.seqlen, args.ppl)}
        print(f"perplexity of {args.ppl}: {report['ppl']['ppl']:.3f} ({report['ppl']['tokens']} tokens, "
              f"{report['ppl']['windows']} windows of {args.seqlen}, the last {report['ppl']['dropped']} dropped)")
    if args.no_tasks or (args.ppl and not is_multimodal(model) and not args.data):
        return report
    if not is_multimodal(model) and not args.data:
        raise AtvSparseError(f"{model_dir}: {type(model).__name__} is not a vision-language model, so it cannot run "
                             "the image tasks; use --ppl FILE for text perplexity, or --data with text-only questions")
    if args.data:
        items = limit_items(data_items, args.per_task, args.limit)
        report["data"] = args.data
        describe = {}
    else:
        n_tasks = len(args.tasks or TASKS)
        per_task = args.per_task or DEFAULT_PER_TASK
        per_task = per_task if args.limit is None else min(per_task, -(-args.limit // n_tasks))
        items = limit_items(synthetic_items(per_task, args.seed, tuple(args.tasks) if args.tasks else None,
                                            size=scene_size(processor)), None, args.limit)
        report["data"] = f"synthetic test split, {per_task} per task, seed {args.seed}"
        describe = describe_tasks()
    vocabulary = None
    if args.choices:
        vocabulary = ({t: tuple(sorted({it.answer for it in data_items if it.task == t})) for t in
                       dict.fromkeys(it.task for it in items)} if args.data else
                      synthetic_vocabulary(tuple(dict.fromkeys(it.task for it in items))))

    def score(m, proc, key: str) -> dict:
        scored = prepare_items(m, proc, items, args.batch_size, vocabulary) if vocabulary else items
        if vocabulary and scored.choices_left_out:
            report[key] = scored.choices_left_out
        return evaluate_model(m, proc, scored, args.scorer, args.batch_size, progress=not args.quiet)

    result = score(model, processor, "choices_left_out")
    if args.baseline:
        base_model, base_processor = load_model_and_processor(args.baseline, dtype=dtype, device=device)
        baseline = score(base_model, base_processor, "baseline_choices_left_out")
        result = compare(result, baseline)
        if "average_choice" in baseline:
            result["baseline_average_choice"] = baseline["average_choice"]
        report["baseline"] = args.baseline
    print(_format_table(result, describe))
    for task, why in report.get("choices_left_out", {}).items():
        print(f"closed choice: {task} left out ({why})")
    if "baseline_average_choice" in result:
        print(f"closed choice: {100 * result['average_choice']:.1f}% (baseline {100 * result['baseline_average_choice']:.1f}%)")
    report.update(result)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except AtvSparseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:  # a temporary name renamed when complete, so a failed write leaves no partial file
        out = Path(args.json)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
