"""Items turned into model inputs: chat messages through the checkpoint's own template and processor,
and for teacher forcing the positions and ids of each reference answer."""

from __future__ import annotations

import torch

from ..errors import AtvSparseError
from .items import EvalItem


def chat_messages(item: EvalItem, with_answer: bool) -> list[dict]:
    """The item as chat messages: the user's question (after an image slot when it has an image),
    then, ``with_answer``, the assistant's reference answer."""
    content = ([{"type": "image"}] if item.image is not None else []) + [{"type": "text", "text": item.question}]
    messages = [{"role": "user", "content": content}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": item.answer}]})
    return messages


def tokenizer_of(processor):
    """The tokenizer of a processor (a text-only model's "processor" is its tokenizer)."""
    return getattr(processor, "tokenizer", processor)


def process_batch(processor, items: list[EvalItem], texts: list[str], padding_side: str) -> dict:
    """The processor's tensors for rendered chat ``texts`` and the items' images, padded on
    ``padding_side`` (no second BOS when the template writes one)."""
    tokenizer = tokenizer_of(processor)
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


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS id and every EOS id of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return {i for i in ids if i is not None}


def teacher_forced_inputs(processor, items: list[EvalItem], eos: set[int]) -> tuple[dict, list]:
    """The processed prompt + answer batch of ``items`` and, per item, (row, first answer position,
    answer ids up to and including the first end-of-turn id)."""
    prompts = [processor.apply_chat_template(chat_messages(it, False), add_generation_prompt=True, tokenize=False)
               for it in items]
    fulls = [processor.apply_chat_template(chat_messages(it, True), tokenize=False) for it in items]
    for it, prompt, full in zip(items, prompts, fulls, strict=True):
        if not full.startswith(prompt):
            raise AtvSparseError(f"item {it.key!r}: the chat template does not continue the generation prompt with "
                                 "the answer; use --scorer generate")
    prompt_batch = process_batch(processor, items, prompts, "right")
    batch = process_batch(processor, items, fulls, "right")
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
