"""Pieces shared by the tiny models' training scripts (``benchmarks/tiny_model``, ``benchmarks/tiny_next``):
conversations encoded without Jinja, batching, the answer-only loss, validation scores, saving."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import NUM_IMAGE_TOKENS


class ConversationEncoder:
    """Token ids and answer labels of chat-formatted conversations, as the processor would build them
    for images of ``num_image_tokens`` tokens (the bundled tiny VLM: 64; the tiny LLaVA-NeXT's
    112 px scenes: 336).

    ``encode(turns, has_image)`` -> (input_ids, labels), 1-D int64; labels are -100 except on each
    answer and its EOS. The text is split at turn boundaries, which are pre-token boundaries of the
    byte-level BPE ("ASSISTANT:" | " answer" | "</s>" | "USER: "), so the concatenated pieces are
    the ids of the whole string; the pieces are cached.
    """

    def __init__(self, tokenizer, num_image_tokens: int = NUM_IMAGE_TOKENS):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def encode(self, turns: list[tuple[str, str]], has_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
        bos, eos = self.tokenizer.bos_token, self.tokenizer.eos_token
        ids, labels = [], []
        for k, (question, answer) in enumerate(turns):
            head = f"{bos}USER: " if k == 0 else "USER: "
            prompt = self._ids(f"{head}{question} ASSISTANT:")
            if k == 0 and has_image:
                prompt = (self._ids(f"{bos}USER: ") + [self.image_token_id] * self.num_image_tokens
                          + self._ids(f"\n{question} ASSISTANT:"))
            reply = self._ids(f" {answer}{eos}")
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
        return torch.tensor(ids), torch.tensor(labels)


def collate(encoded: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int):
    """Right-padded (input_ids, labels, attention_mask), each (B, T)."""
    length = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
    return ids, labels, mask


def answer_token_losses(model, ids, labels, mask, pixel_values=None, **image_inputs):
    """Per answer token: (cross-entropy (n,), argmax == target (n,), row index (n,), turn index
    (n,)) and ``starts`` (B, T - 1) bool, the positions that predict each answer's first token, in
    turn order; logits only where a label follows (the lm_head on every position would cost more
    than the 6 blocks' MLP). ``image_inputs``: e.g. LLaVA-NeXT's ``image_sizes``."""
    hidden = model.model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask,
                         use_cache=False, **image_inputs).last_hidden_state
    target = labels[:, 1:]
    supervised = target != -100
    starts = supervised & ~F.pad(supervised[:, :-1], (1, 0), value=False)
    turn = starts.flatten().cumsum(0).view_as(target) - 1
    rows, cols = supervised.nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols]).float()
    goal = target[rows, cols]
    return F.cross_entropy(logits, goal, reduction="none"), logits.argmax(-1) == goal, rows, turn[rows, cols], starts


def per_turn_mean(losses: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """(n_turns,) the mean token loss of each answer: every answer weighs the same, whether it is
    a one-token yes / no or a 40-token caption."""
    n = int(turn.max()) + 1
    total = torch.zeros(n, dtype=losses.dtype).index_add(0, turn, losses)
    return total / torch.bincount(turn, minlength=n).to(losses.dtype)


def save(model, processor, path: Path) -> None:
    """Save model and processor to ``path`` through a temporary sibling, replacing ``path`` only
    once both are written (a run stopped mid-save keeps the previous copy)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


@torch.no_grad()
def teacher_forced_scores(model, processor, items, encoder, image_of, question_of, batch_size: int = 32) -> dict:
    """Teacher-forced exact match (answer + EOS) and mean answer NLL per task of single-turn items.

    encoder: a ``ConversationEncoder`` for the model's image-token count; image_of(item) -> PIL
    image or None (a text-only question); question_of(item) -> the question text. Returns
    {"accuracy": {task: share}, "average": unweighted mean over tasks, "nll": {task: nats}}.
    Leaves the model in eval mode.
    """
    model.eval()
    correct: dict[str, list[bool]] = {}
    nll: dict[str, list[float]] = {}
    for start in range(0, len(items), batch_size):
        chunk = [(it, image_of(it)) for it in items[start:start + batch_size]]
        for has_image in (True, False):
            part = [(it, image) for it, image in chunk if (image is not None) == has_image]
            if not part:
                continue
            ids, labels, mask = collate([encoder.encode([(question_of(it), it.answer)], has_image) for it, _ in part],
                                        processor.tokenizer.pad_token_id)
            images = {}
            if has_image:
                enc = processor.image_processor([image for _, image in part], return_tensors="pt")
                images = {k: v for k, v in enc.items() if k in ("pixel_values", "image_sizes")}
            losses, hits, rows, _, _ = answer_token_losses(model, ids, labels, mask, **images)
            for i, (it, _) in enumerate(part):
                sel = rows == i
                correct.setdefault(it.task, []).append(bool(hits[sel].all()))
                nll.setdefault(it.task, []).append(float(losses[sel].sum()))
    acc = {t: sum(v) / len(v) for t, v in correct.items()}
    return {"accuracy": acc, "average": sum(acc.values()) / len(acc),
            "nll": {t: sum(v) / len(v) for t, v in nll.items()}}
