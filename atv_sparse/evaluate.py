"""``python -m atv_sparse.evaluate``: accuracy of a (pruned) vision-language model on short-answer tasks.

    python -m atv_sparse.evaluate                         # the bundled tiny VLM, synthetic test split
    python -m atv_sparse.evaluate OUT --baseline DENSE    # + retention against the dense model
    python -m atv_sparse.evaluate OUT --data qa.jsonl     # your {image, question, answer} lines
    python -m atv_sparse.evaluate OUT --ppl held_out.txt  # text perplexity (any model)

Items: the synthetic test split of :mod:`atv_sparse.data.synthetic` (``--per-task`` items per
task, ``--seed``), or a JSONL file of ``{"image": "img/1.png", "question": ..., "answer": ...}``
(optional ``"task"`` to group the scores; ``image`` null or absent for a text-only question;
image paths relative to the file).

Scoring, per item: the question goes through the checkpoint's own chat template and processor;
the reference answer is the assistant turn that follows. ``teacher-forced`` (default): the item
is correct when every token of the reference answer and its end-of-turn token is the argmax of
the model's prediction given the prompt and the reference tokens before it, which is exactly
"greedy decoding would write the answer and stop"; one forward pass per item instead of one per
token. ``generate``: greedy decoding, then exact match after :func:`normalize_answer`. Both
report the answer NLL (the sum of -log p over the answer and end-of-turn tokens), a continuous
second metric.

Per task: accuracy, mean answer NLL, items and *distinct* items (a task that repeats a few items
has fewer independent samples than items). The average is the unweighted mean over tasks.
With ``--baseline``: retention per task = 100 * accuracy / baseline accuracy, and the average
retention is the unweighted mean of the per-task retentions (the "Average" column of the ATV
paper's tables, where the dense model is 100%); tasks where the baseline scores 0 are left out
of it. Paired difference and its standard error (same items) are reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import torch

from .errors import AtvSparseError

SCORERS = ("teacher-forced", "generate")
DEFAULT_PER_TASK = 500
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ARTICLES = re.compile(r"^(a|an|the)\s+")
_PUNCT_EDGES = re.compile(r"^[\s\"'.,;:!?()\[\]]+|[\s\"'.,;:!?()\[\]]+$")


# ---------------------------------------------------------------------------------------------
# Pure scoring functions
# ---------------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation and quotes and a leading article
    dropped: ``" The Red."`` -> ``"red"``."""
    text = " ".join(text.lower().split())
    text = _PUNCT_EDGES.sub("", text)
    return _ARTICLES.sub("", text)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def summarize(records: list[dict]) -> dict:
    """Per-task and average scores of per-item ``records`` ({task, key, correct, nll}).

    Returns ``{"tasks": {task: {n, distinct, accuracy, nll}}, "average": mean accuracy over tasks,
    "average_nll": mean of the task NLLs}``; tasks in order of first appearance.
    """
    if not records:
        raise AtvSparseError("nothing to score: the evaluation set is empty")
    tasks: dict[str, list[dict]] = {}
    for r in records:
        tasks.setdefault(r["task"], []).append(r)
    out = {}
    for task, rs in tasks.items():
        out[task] = {"n": len(rs), "distinct": len({r["key"] for r in rs}),
                     "accuracy": sum(bool(r["correct"]) for r in rs) / len(rs),
                     "nll": sum(r["nll"] for r in rs) / len(rs)}
    return {"tasks": out, "average": sum(t["accuracy"] for t in out.values()) / len(out),
            "average_nll": sum(t["nll"] for t in out.values()) / len(out)}


def retention(accuracy: float, baseline_accuracy: float) -> float | None:
    """100 * accuracy / baseline_accuracy (percent of the dense score); None when the baseline is 0."""
    return None if baseline_accuracy == 0 else 100.0 * accuracy / baseline_accuracy


def paired_difference(correct: list[bool], baseline_correct: list[bool]) -> tuple[float, float]:
    """(mean of correct - baseline_correct, its standard error) over the same items, in points (x100)."""
    if len(correct) != len(baseline_correct) or not correct:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    diffs = [float(a) - float(b) for a, b in zip(correct, baseline_correct, strict=True)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return 100.0 * mean, 100.0 * math.sqrt(var / len(diffs))


def compare(result: dict, baseline: dict) -> dict:
    """Retention and paired differences of ``result`` against ``baseline`` (both from
    :func:`evaluate_model` on the same items). Adds per task ``baseline_accuracy``,
    ``retention`` (%), ``delta`` and ``delta_se`` (points), and ``average_retention``."""
    keys = [(r["task"], r["key"]) for r in result["records"]]
    if keys != [(r["task"], r["key"]) for r in baseline["records"]]:
        raise AtvSparseError("the baseline was scored on different items; evaluate both on the same set")
    tasks = {}
    for task, scores in result["tasks"].items():
        base = baseline["tasks"][task]["accuracy"]
        ours = [r["correct"] for r in result["records"] if r["task"] == task]
        theirs = [r["correct"] for r in baseline["records"] if r["task"] == task]
        delta, se = paired_difference(ours, theirs)
        tasks[task] = {**scores, "baseline_accuracy": base, "retention": retention(scores["accuracy"], base),
                       "delta": delta, "delta_se": se}
    kept = [t["retention"] for t in tasks.values() if t["retention"] is not None]
    return {**result, "tasks": tasks, "baseline_average": baseline["average"],
            "average_retention": sum(kept) / len(kept) if kept else None}


# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalItem:
    """One question: ``image`` RGB or None (text only), ``key`` identifies the item for distinct counts."""

    task: str
    question: str
    answer: str
    image: object = None
    key: str = ""


def synthetic_items(per_task: int = 500, seed: int = 0, tasks: tuple[str, ...] | None = None) -> list[EvalItem]:
    """The synthetic test split as :class:`EvalItem` (images rendered)."""
    from .data import synthetic

    tasks = tuple(tasks) if tasks else synthetic.TASKS
    unknown = [t for t in tasks if t not in synthetic.TASKS]
    if unknown:
        raise AtvSparseError(f"unknown task(s) {', '.join(unknown)}; the synthetic tasks are "
                             f"{', '.join(synthetic.TASKS)}")
    return [EvalItem(it.task, it.question, it.answer, it.image(), it.key)
            for it in synthetic.test_items(per_task, seed, tasks)]


def read_eval_file(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The items of a JSONL file; every problem is an error naming the file and line."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise AtvSparseError(f"evaluation file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AtvSparseError(f"evaluation file {path} is not UTF-8 text") from None
    items = []
    for lineno, line in enumerate(lines, 1):
        if limit is not None and len(items) >= limit:
            break
        if not line.strip():
            continue
        where = f"evaluation file {path}, line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AtvSparseError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise AtvSparseError(f"{where}: expected a JSON object with \"question\" and \"answer\"")
        for field in ("question", "answer"):
            if field not in record:
                raise AtvSparseError(f'{where}: missing field "{field}" (each line needs "question", "answer" and '
                                     'optionally "image" and "task")')
            if not isinstance(record[field], str) or not record[field].strip():
                raise AtvSparseError(f'{where}: "{field}" must be a non-empty string')
        task = record.get("task", "data")
        if not isinstance(task, str) or not task:
            raise AtvSparseError(f'{where}: "task" must be a non-empty string')
        image = None
        if record.get("image") is not None:
            if not isinstance(record["image"], str):
                raise AtvSparseError(f'{where}: "image" must be a path (string) or null')
            image_path = Path(record["image"]).expanduser()
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            try:
                with Image.open(image_path) as im:
                    im.load()
                    image = im.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                raise AtvSparseError(f"{where}: cannot read image {image_path} ({type(e).__name__}: {e})") from None
        key = f"{record.get('image')}#{record['question']}"
        items.append(EvalItem(task, record["question"], record["answer"], image, key))
    if not items:
        raise AtvSparseError(f"evaluation file {path} is empty (no JSON lines)")
    return items


def limit_items(items: list[EvalItem], per_task: int | None = None, limit: int | None = None) -> list[EvalItem]:
    """At most ``per_task`` items of each task (first ones), then at most ``limit`` in total."""
    if per_task is not None:
        seen: dict[str, int] = {}
        kept = []
        for it in items:
            if seen.get(it.task, 0) < per_task:
                kept.append(it)
                seen[it.task] = seen.get(it.task, 0) + 1
        items = kept
    return items if limit is None else items[:limit]


# ---------------------------------------------------------------------------------------------
# Model side
# ---------------------------------------------------------------------------------------------

def is_multimodal(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def load_model_and_processor(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, processor) of a dense, dense-with-zeros or compressed checkpoint, through
    ``atv_sparse.load``; the processor of a text-only model is its tokenizer."""
    from .models.adapter import read_config
    from .nn.load import load

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model = load(model_dir, device=device, dtype=dtype)
    if "vision_config" in config or "vision_config" in config.get("text_config", {}):
        from .models.processors import load_processor

        return model, load_processor(model_dir)
    from transformers import AutoTokenizer

    try:
        return model, AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise AtvSparseError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _messages(item: EvalItem, with_answer: bool) -> list[dict]:
    content = ([{"type": "image"}] if item.image is not None else []) + [{"type": "text", "text": item.question}]
    messages = [{"role": "user", "content": content}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": item.answer}]})
    return messages


def _tokenizer(processor):
    """The tokenizer of a processor (a text-only model's "processor" is its tokenizer)."""
    return getattr(processor, "tokenizer", processor)


def _process(processor, items: list[EvalItem], texts: list[str], padding_side: str) -> dict:
    tokenizer = _tokenizer(processor)
    images = [it.image for it in items if it.image is not None] or None
    kwargs = {"add_special_tokens": False} if tokenizer.bos_token and texts[0].startswith(tokenizer.bos_token) else {}
    if images is not None:
        kwargs["images"] = images
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        return dict(processor(text=texts, padding=True, return_tensors="pt", **kwargs))
    finally:
        tokenizer.padding_side = old_side


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return {i for i in ids if i is not None}


def _teacher_forced_inputs(processor, items: list[EvalItem], eos: set[int]) -> tuple[dict, list]:
    """The processed prompt + answer batch of ``items`` and, per item, (row, first answer position,
    answer ids up to and including the first end-of-turn id)."""
    prompts = [processor.apply_chat_template(_messages(it, False), add_generation_prompt=True, tokenize=False)
               for it in items]
    fulls = [processor.apply_chat_template(_messages(it, True), tokenize=False) for it in items]
    for it, prompt, full in zip(items, prompts, fulls, strict=True):
        if not full.startswith(prompt):
            raise AtvSparseError(f"item {it.key!r}: the chat template does not continue the generation prompt with "
                                 "the answer; use --scorer generate")
    prompt_batch = _process(processor, items, prompts, "right")
    batch = _process(processor, items, fulls, "right")
    targets = []
    for i, it in enumerate(items):
        n_prompt = int(prompt_batch["attention_mask"][i].sum())
        n_full = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i]
        if not torch.equal(ids[:n_prompt], prompt_batch["input_ids"][i, :n_prompt]):
            raise AtvSparseError(f"item {it.key!r}: the prompt tokenizes differently inside the full conversation; "
                                 "use --scorer generate")
        target = ids[n_prompt:n_full].tolist()
        stop = next((k for k, t in enumerate(target) if t in eos), None)
        target = target[:stop + 1] if stop is not None else target
        if not target:
            raise AtvSparseError(f"item {it.key!r}: the answer {it.answer!r} adds no tokens after the prompt")
        targets.append((i, n_prompt, target))
    return batch, targets


def _teacher_forced_score(model, batch: dict, targets: list, items: list[EvalItem], device) -> list[dict]:
    """Correctness and answer NLL of each item from one forward pass over prompt + answer."""
    if "decoder_inputs" in batch:  # cached by cache_decoder_inputs: the language model alone
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch["decoder_inputs"].items()}
        hidden = model.get_decoder()(**kwargs).last_hidden_state
    else:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        hidden = model.model(**batch, use_cache=False).last_hidden_state
    rows = torch.tensor([i for i, start, t in targets for _ in t], device=device)
    cols = torch.tensor([start - 1 + k for i, start, t in targets for k in range(len(t))], device=device)
    goal = torch.tensor([tok for _, _, t in targets for tok in t], device=device)
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    nll = torch.nn.functional.cross_entropy(logits, goal, reduction="none")
    hit = logits.argmax(-1) == goal
    out, pos = [], 0
    for (_, _, t), it in zip(targets, items, strict=True):
        n = len(t)
        out.append({"task": it.task, "key": it.key, "correct": bool(hit[pos:pos + n].all()),
                    "nll": float(nll[pos:pos + n].sum())})
        pos += n
    return out


def _teacher_forced_batch(model, processor, items: list[EvalItem], device) -> list[dict]:
    batch, targets = _teacher_forced_inputs(processor, items, _eos_ids(model, _tokenizer(processor)))
    return _teacher_forced_score(model, batch, targets, items, device)


def _generate_batch(model, processor, items: list[EvalItem], device, max_new_tokens: int) -> list[dict]:
    """Greedy decoding, exact match after normalisation; the NLL comes from the teacher-forced pass."""
    prompts = [processor.apply_chat_template(_messages(it, False), add_generation_prompt=True, tokenize=False)
               for it in items]
    batch = _process(processor, items, prompts, "left")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    tokenizer = _tokenizer(processor)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(_eos_ids(model, tokenizer)))
    new = out[:, batch["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    try:
        forced = _teacher_forced_batch(model, processor, items, device)
    except AtvSparseError:  # the template cannot be teacher-forced: no NLL, greedy scores still stand
        forced = [{"task": it.task, "key": it.key, "nll": float("nan")} for it in items]
    return [{**f, "correct": exact_match(text, it.answer), "prediction": text}
            for f, text, it in zip(forced, texts, items, strict=True)]


def _batches(items: list[EvalItem], batch_size: int) -> list[list[int]]:
    """Item indices per batch: image and text-only items apart (a processor call takes one kind)."""
    order = sorted(range(len(items)), key=lambda i: items[i].image is None)
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or (items[current[0]].image is None) != (items[i].image is None)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _check_can_score(model, processor, items: list[EvalItem]) -> None:
    if not items:
        raise AtvSparseError("nothing to score: the evaluation set is empty")
    if any(it.image is not None for it in items) and not is_multimodal(model):
        raise AtvSparseError(f"{type(model).__name__} is not a vision-language model: it cannot answer questions "
                             "about images (text perplexity with --ppl still works)")
    if not hasattr(processor, "apply_chat_template") or not getattr(processor, "chat_template", None):
        raise AtvSparseError("the checkpoint has no chat template; the questions cannot be formatted for it")


@dataclasses.dataclass
class PreparedItems:
    """``items`` run through the processor once, for teacher-forced scoring of many models that
    share the processor (the pruned variants of one model): see :func:`prepare_items`."""

    items: list[EvalItem]
    batches: list[tuple[list[int], dict, list]]  # (item indices, processed batch, answer targets)


def prepare_items(model, processor, items: list[EvalItem], batch_size: int = 32) -> PreparedItems:
    """Process ``items`` once (chat template, tokenizer, image processor) for :func:`evaluate_model`."""
    _check_can_score(model, processor, items)
    eos = _eos_ids(model, _tokenizer(processor))
    batches = []
    for idx in _batches(items, batch_size):
        batch, targets = _teacher_forced_inputs(processor, [items[i] for i in idx], eos)
        batches.append((idx, batch, targets))
    return PreparedItems(items, batches)


class _DecoderInputs(Exception):
    def __init__(self, kwargs: dict):
        super().__init__()
        self.kwargs = kwargs


@torch.no_grad()
def cache_decoder_inputs(model, prepared: PreparedItems) -> PreparedItems:
    """The same items, each batch replaced by what ``model``'s language model (``get_decoder()``)
    receives: the input embeddings with the image features in place, the attention mask and the
    positions. Scoring from them runs the decoder blocks alone, which is exact for every model
    that shares ``model``'s embeddings, vision tower and projector: the pruned variants of one
    model whose decoder blocks alone were pruned (the default targets). Not for the MoT probe,
    which routes by input ids."""
    decoder = model.get_decoder()

    def stop(module, args, kwargs):
        raise _DecoderInputs(dict(kwargs))

    device = next(model.parameters()).device
    handle = decoder.register_forward_pre_hook(stop, with_kwargs=True)
    batches = []
    try:
        for idx, batch, targets in prepared.batches:
            try:
                model.model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                            use_cache=False)
            except _DecoderInputs as caught:
                batches.append((idx, {"decoder_inputs": caught.kwargs}, targets))
            else:
                raise AtvSparseError(f"{type(model).__name__}: its language model never ran; cannot cache its inputs")
    finally:
        handle.remove()
    return PreparedItems(prepared.items, batches)


@torch.no_grad()
def evaluate_model(model, processor, items: list[EvalItem] | PreparedItems, scorer: str = "teacher-forced",
                   batch_size: int = 32, max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Score ``model`` on ``items`` (or on items already prepared by :func:`prepare_items`, teacher-
    forced only): :func:`summarize`'s dict plus ``records`` (one per item, in order: task, key,
    correct, nll, and the generated text with ``scorer="generate"``)."""
    from tqdm.auto import tqdm

    if scorer not in SCORERS:
        raise AtvSparseError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORERS)}")
    prepared = items if isinstance(items, PreparedItems) else None
    if prepared is not None and scorer != "teacher-forced":
        raise AtvSparseError("prepared items can only be scored teacher-forced")
    items = prepared.items if prepared is not None else items
    _check_can_score(model, processor, items)
    device = next(model.parameters()).device
    model.eval()
    records: list[dict | None] = [None] * len(items)
    work = prepared.batches if prepared is not None else [(idx, None, None) for idx in _batches(items, batch_size)]
    for idx, batch, targets in tqdm(work, desc="Evaluating", unit="batch", disable=not progress, leave=False):
        chunk = [items[i] for i in idx]
        if batch is not None:
            scored = _teacher_forced_score(model, batch, targets, chunk, device)
        elif scorer == "teacher-forced":
            scored = _teacher_forced_batch(model, processor, chunk, device)
        else:
            scored = _generate_batch(model, processor, chunk, device, max_new_tokens)
        for i, rec in zip(idx, scored, strict=True):
            records[i] = rec
    return {**summarize(records), "records": records}


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, seqlen: int = 256, source: str = "text") -> dict:
    """Perplexity over consecutive non-overlapping windows of ``seqlen`` tokens (the last, shorter
    window included), each scored from its own start, as Wanda's WikiText evaluation does:
    ``exp(sum of token NLL / predicted tokens)``. Returns {ppl, tokens, windows}."""
    if seqlen < 2:
        raise AtvSparseError(f"--seqlen must be at least 2, got {seqlen}")
    ids = _tokenizer(tokenizer)(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise AtvSparseError(f"{source}: {ids.numel()} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    total, count, windows = 0.0, 0, 0
    for start in range(0, ids.numel() - 1, seqlen):
        window = ids[start:start + seqlen].unsqueeze(0).to(device)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total += float(nll)
        count += window.shape[1] - 1
        windows += 1
    return {"ppl": math.exp(total / count), "tokens": int(ids.numel()), "windows": windows, "seqlen": seqlen}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m atv_sparse.evaluate", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--seqlen", type=int, default=256, help="perplexity window in tokens")
    p.add_argument("--no-tasks", action="store_true", help="skip the question answering (with --ppl)")
    p.add_argument("--scorer", choices=SCORERS, default="teacher-forced",
                   help="teacher-forced exact match over answer + end-of-turn (one forward pass), or greedy decoding")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="dtype to run in (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="OUT", help="write the scores (and per-item records) as JSON to OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _format_table(result: dict, describe: dict[str, str]) -> str:
    baseline = "average_retention" in result
    head = ["task", "mirrors", "n", "distinct", "accuracy", "answer NLL"]
    if baseline:
        head += ["baseline", "retention", "delta (SE)"]
    rows = [head]
    for task, s in result["tasks"].items():
        row = [task, describe.get(task, ""), str(s["n"]), str(s["distinct"]), f"{100 * s['accuracy']:.1f}",
               f"{s['nll']:.3f}"]
        if baseline:
            ret = "-" if s["retention"] is None else f"{s['retention']:.1f}%"
            row += [f"{100 * s['baseline_accuracy']:.1f}", ret, f"{s['delta']:+.1f} ({s['delta_se']:.1f})"]
        rows.append(row)
    avg = ["average", "", str(sum(s["n"] for s in result["tasks"].values())), "", f"{100 * result['average']:.1f}",
           f"{result['average_nll']:.3f}"]
    if baseline:
        ret = result["average_retention"]
        avg += [f"{100 * result['baseline_average']:.1f}", "-" if ret is None else f"{ret:.1f}%", ""]
    rows.append(avg)
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise AtvSparseError(f"perplexity file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AtvSparseError(f"perplexity file {path} is not UTF-8 text") from None
    if not text.strip():
        raise AtvSparseError(f"perplexity file {path} is empty")
    return text


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
    from .tiny_vlm import bundled_model_dir

    model_dir = Path(args.model_dir) if args.model_dir else bundled_model_dir()
    device, dtype = _device(args.device), DTYPES[args.dtype]
    for name in ("per_task", "limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AtvSparseError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    model, processor = load_model_and_processor(model_dir, dtype=dtype, device=device)
    report: dict = {"model": str(model_dir), "device": device, "scorer": args.scorer}
    if args.ppl:
        text = _read_text(args.ppl)
        report["ppl"] = {"file": args.ppl, **text_perplexity(model, processor, text, args.seqlen, args.ppl)}
        print(f"perplexity of {args.ppl}: {report['ppl']['ppl']:.3f} ({report['ppl']['tokens']} tokens, "
              f"{report['ppl']['windows']} windows of {args.seqlen})")
    if args.no_tasks or (args.ppl and not is_multimodal(model) and not args.data):
        return report
    if not is_multimodal(model) and not args.data:
        raise AtvSparseError(f"{model_dir}: {type(model).__name__} is not a vision-language model, so it cannot run "
                             "the image tasks; use --ppl FILE for text perplexity, or --data with text-only questions")
    if args.data:
        items = limit_items(read_eval_file(args.data), args.per_task, args.limit)
        report["data"] = args.data
        describe = {}
    else:
        from .data.synthetic import TASKS, describe_tasks

        n_tasks = len(args.tasks or TASKS)
        per_task = args.per_task or DEFAULT_PER_TASK
        per_task = per_task if args.limit is None else min(per_task, -(-args.limit // n_tasks))
        items = limit_items(synthetic_items(per_task, args.seed, tuple(args.tasks) if args.tasks else None),
                            None, args.limit)
        report["data"] = f"synthetic test split, {per_task} per task, seed {args.seed}"
        describe = describe_tasks()
    result = evaluate_model(model, processor, items, args.scorer, args.batch_size, progress=not args.quiet)
    if args.baseline:
        base_model, base_processor = load_model_and_processor(args.baseline, dtype=dtype, device=device)
        baseline = evaluate_model(base_model, base_processor, items, args.scorer, args.batch_size,
                                  progress=not args.quiet)
        result = compare(result, baseline)
        report["baseline"] = args.baseline
    print(_format_table(result, describe))
    report.update(result)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except AtvSparseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
