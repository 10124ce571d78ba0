"""Scoring a model on items: teacher-forced exact match (one forward pass per batch) or greedy
decoding, each with the answer NLL; items processed once for many models (:func:`prepare_items`),
optionally with closed-choice scoring from the same pass (:mod:`.choices`), and decoder inputs
cached for the pruned variants of one model (:func:`cache_decoder_inputs`)."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import AtvSparseError
from .choices import ChoiceSet, choice_correct, choice_sets
from .items import EvalItem
from .loading import is_multimodal
from .metrics import exact_match, summarize
from .prompts import chat_messages, end_of_turn_ids, process_batch, teacher_forced_inputs, tokenizer_of

SCORERS = ("teacher-forced", "generate")


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _teacher_forced_score(model, batch: dict, targets: list, items: list[EvalItem], device,
                          choices: dict[str, ChoiceSet] | None = None) -> list[dict]:
    """Correctness and answer NLL of each item from one forward pass over prompt + answer, and
    ``choice_correct`` for the items of the tasks in ``choices``."""
    if "decoder_inputs" in batch:  # cached by cache_decoder_inputs: the language model alone
        hidden = model.get_decoder()(**_to_device(batch["decoder_inputs"], device)).last_hidden_state
    else:
        hidden = model.model(**_to_device(batch, device), use_cache=False).last_hidden_state
    rows = torch.tensor([i for i, start, t in targets for _ in t], device=device)
    cols = torch.tensor([start - 1 + k for i, start, t in targets for k in range(len(t))], device=device)
    goal = torch.tensor([tok for _, _, t in targets for tok in t], device=device)
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    nll = torch.nn.functional.cross_entropy(logits, goal, reduction="none")
    hit = logits.argmax(-1) == goal
    out, pos = [], 0
    for (_, _, t), it in zip(targets, items, strict=True):
        n = len(t)
        rec = {"task": it.task, "key": it.key, "correct": bool(hit[pos:pos + n].all()),
               "nll": float(nll[pos:pos + n].sum())}
        if choices and it.task in choices:
            rec["choice_correct"] = choice_correct(logits[pos], choices[it.task].first_ids.to(device), t[0])
        out.append(rec)
        pos += n
    return out


def _teacher_forced_batch(model, processor, items: list[EvalItem], device) -> list[dict]:
    batch, targets = teacher_forced_inputs(processor, items, end_of_turn_ids(model, tokenizer_of(processor)))
    return _teacher_forced_score(model, batch, targets, items, device)


def _generate_batch(model, processor, items: list[EvalItem], device, max_new_tokens: int) -> list[dict]:
    """Greedy decoding, exact match after normalisation; the NLL comes from the teacher-forced pass."""
    prompts = [processor.apply_chat_template(chat_messages(it, False), add_generation_prompt=True, tokenize=False)
               for it in items]
    batch = process_batch(processor, items, prompts, "left")
    batch = _to_device(batch, device)
    tokenizer = tokenizer_of(processor)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(end_of_turn_ids(model, tokenizer)))
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
    choices: dict[str, ChoiceSet] | None = None  # tasks scored by closed choice as well
    choices_left_out: dict[str, str] | None = None  # task -> why it has no closed-choice score


def prepare_items(model, processor, items: list[EvalItem], batch_size: int = 32,
                  vocabulary: dict[str, tuple[str, ...]] | None = None) -> PreparedItems:
    """Process ``items`` once (chat template, tokenizer, image processor) for :func:`evaluate_model`;
    with ``vocabulary`` (task -> candidate answers, e.g. :func:`.choices.synthetic_vocabulary`) the
    tasks whose candidates :func:`.choices.choice_sets` accepts are scored by closed choice too."""
    _check_can_score(model, processor, items)
    eos = end_of_turn_ids(model, tokenizer_of(processor))
    choices, left_out = choice_sets(processor, items, vocabulary, eos) if vocabulary else (None, None)
    batches = []
    for idx in _batches(items, batch_size):
        batch, targets = teacher_forced_inputs(processor, [items[i] for i in idx], eos)
        for (_, _, t), i in zip(targets, idx, strict=True):
            it = items[i]
            if choices and it.task in choices and t[0] != int(
                    choices[it.task].first_ids[choices[it.task].answers.index(it.answer)]):
                raise AtvSparseError(f"item {it.key!r}: its answer's first token in context ({t[0]}) is not its "
                                     f"task's candidate token for {it.answer!r}; closed choice cannot score it")
        batches.append((idx, batch, targets))
    return PreparedItems(items, batches, choices, left_out)


@torch.no_grad()
def cache_decoder_inputs(model, prepared: PreparedItems) -> PreparedItems:
    """The same items, each batch replaced by what ``model``'s language model (``get_decoder()``)
    receives: the input embeddings with the image features in place, the attention mask and the
    positions. Scoring from them runs the decoder blocks alone, which is exact for every model
    that shares ``model``'s embeddings, vision tower and projector: the pruned variants of one
    model whose decoder blocks alone were pruned (the default targets). Not for the MoT probe,
    which routes by input ids.

    A forward pre-hook on the decoder records its keyword arguments; the forward then runs to the
    end and its output is dropped (one dense pass per batch, paid once for every variant scored
    from the cache)."""
    decoder = model.get_decoder()
    calls: list[dict] = []

    def record(module, args, kwargs):
        calls.append(dict(kwargs))

    device = next(model.parameters()).device
    handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
    batches = []
    try:
        for idx, batch, targets in prepared.batches:
            calls.clear()
            model.model(**_to_device(batch, device), use_cache=False)
            if len(calls) != 1:
                raise AtvSparseError(f"{type(model).__name__}: its language model ran {len(calls)} times in one "
                                     "forward; cannot cache its inputs")
            batches.append((idx, {"decoder_inputs": calls[0]}, targets))
    finally:
        handle.remove()
    return dataclasses.replace(prepared, batches=batches)


@torch.no_grad()
def evaluate_model(model, processor, items: list[EvalItem] | PreparedItems, scorer: str = "teacher-forced",
                   batch_size: int = 32, max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Score ``model`` on ``items`` (or on items already prepared by :func:`prepare_items`, teacher-
    forced only): :func:`summarize`'s dict plus ``records`` (one per item, in order: task, key,
    correct, nll, ``choice_correct`` where the prepared items carry closed choices, and the
    generated text with ``scorer="generate"``)."""
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
            scored = _teacher_forced_score(model, batch, targets, chunk, device, prepared.choices)
        elif scorer == "teacher-forced":
            scored = _teacher_forced_batch(model, processor, chunk, device)
        else:
            scored = _generate_batch(model, processor, chunk, device, max_new_tokens)
        for i, rec in zip(idx, scored, strict=True):
            records[i] = rec
    return {**summarize(records), "records": records}

