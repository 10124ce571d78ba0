"""Train the tiny LLaVA-NeXT (``atv_sparse.tinybench.next_model``) the LLaVA way, on a CPU.

    python benchmarks/tiny_next/train.py --out benchmarks/tiny_next/run    # ~90 min on 2 cores

Three stages, each with its own AdamW (betas 0.9 / 0.98, weight decay 0.01), linear warm-up and
cosine to 5% over its ``--minutes``; what each stage trains is ``tiny_next.STAGES`` (applied by
``tiny_next.set_stage``, nothing else freezes parameters):

1. ``text`` - the language model alone, from scratch, on text: the arithmetic and facts questions,
   and every image task asked about a scene described in words (the scene's ShareGPT4V-style
   caption in place of the image), so the language model learns what the questions mean before
   it ever sees a visual token;
2. ``align`` (LLaVA stage 1) - only the projector and ``image_newline``: 112 px scenes of the train
   split, "Describe the image." -> the caption; the language model and the vision tower (the
   bundled tiny VLM's trained CLIP, copied in) frozen;
3. ``instruct`` (LLaVA stage 2) - projector, ``image_newline`` and language model: multi-turn
   conversations about train-split scenes (the tasks' questions and captions) plus text-only
   conversations; the vision tower stays frozen.

Loss: cross-entropy on the answers and their EOS only, each answer weighing the same. In the align
and instruct stages, plus the bundled tiny VLM's training-only auxiliary losses
(``atv_sparse.tinybench.supervision``, heads discarded after training): what every projected patch
token of the 5 crops shows and the scene summary (``--aux-weight``), read from the projector's
output and from block ``--scene-layer``'s hidden state where the first answer is predicted, and in
the instruct stage the objects each question refers to (``--ref-weight``, block ``--ref-layer``).
In the align stage their gradients reach only the projector and ``image_newline`` (nothing else
trains); they make the frozen language model's blocks gather the image where a question needs it,
which caption loss alone did not do in 20 minutes (the first run: align loss flat at 1.5, then
image tasks near chance through most of the instruct stage). Every
``--eval-minutes`` and at the end of each stage: teacher-forced exact match on ``--eval-per-task``
calibration-split items per task (never the test split), with images at 112 px (or, in the text
stage, the scene in words), logged to OUT/eval_log.jsonl; task weights become 0.2 + (1 - accuracy).
Each stage's last model is saved to OUT/<stage>; the instruct stage's best validation average to
OUT/best (the model to ship).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

# On a shared CPU, spinning OpenMP workers make 2 threads much slower than 1.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from atv_sparse.tinybench import model as tiny_vlm  # noqa: E402
from atv_sparse.tinybench import next_model as tiny_next  # noqa: E402
from atv_sparse.tinybench import tasks as synthetic  # noqa: E402
from atv_sparse.tinybench.scenes import caption  # noqa: E402
from atv_sparse.tinybench.supervision import (AuxHeads, anyres_patch_labels, referent_labels,  # noqa: E402
                                              scene_labels)
from atv_sparse.tinybench.training import (ConversationEncoder, answer_token_losses, collate,  # noqa: E402
                                           per_turn_mean, save, teacher_forced_scores)

DESCRIBE = "Describe the image."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="benchmarks/tiny_next/run", help="output directory")
    p.add_argument("--stages", nargs="+", default=list(tiny_next.STAGES), choices=list(tiny_next.STAGES),
                   help="stages to run, in order (a later stage starts from OUT/<previous stage>)")
    p.add_argument("--minutes", type=float, nargs=3, default=(30.0, 10.0, 50.0), metavar=("TEXT", "ALIGN", "INSTRUCT"),
                   help="wall-time per stage")
    p.add_argument("--lr", type=float, nargs=3, default=(2e-3, 1e-3, 1e-3), metavar=("TEXT", "ALIGN", "INSTRUCT"))
    p.add_argument("--batch", type=int, nargs=3, default=(32, 16, 16), metavar=("TEXT", "ALIGN", "INSTRUCT"),
                   help="conversations per step (instruct: image conversations; text ones are --batch-text)")
    p.add_argument("--batch-text", type=int, default=12, help="text-only conversations per instruct step")
    p.add_argument("--max-turns", type=int, default=8, help="question / answer turns per conversation, at most")
    p.add_argument("--min-turns", type=int, default=6,
                   help="turns per image conversation, at least (more answers per 336-token image forward)")
    p.add_argument("--caption-weight", type=float, default=0.2,
                   help="weight of a caption among the extra turns of an instruct conversation")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the patch and scene auxiliary losses")
    p.add_argument("--scene-layer", type=int, default=3, help="block whose output feeds the scene-summary head")
    p.add_argument("--ref-weight", type=float, default=0.5, help="weight of the referent loss (instruct stage)")
    p.add_argument("--ref-layer", type=int, default=4, help="block whose output feeds the referent head")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps of each stage")
    p.add_argument("--eval-minutes", type=float, default=6.0)
    p.add_argument("--eval-per-task", type=int, default=40)
    p.add_argument("--max-steps", type=int, default=None, help="stop each stage after this many steps (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def render(item: synthetic.Item):
    return item.scene.render(item.render_seed, size=tiny_next.IMAGE_SIZE)


def in_words(scene, question: str) -> str:
    """An image question asked about a scene described in words (the text stage's input)."""
    return f"{caption(scene)}\n{question}"


class Data:
    """Draws each stage's training conversations and encodes them."""

    def __init__(self, processor, args, rng: random.Random):
        self.processor, self.args, self.rng = processor, args, rng
        self.encoder = ConversationEncoder(processor.tokenizer, tiny_next.NUM_IMAGE_TOKENS)
        self.pad_id = processor.tokenizer.pad_token_id
        self.weights = {task: 1.0 for task in synthetic.TASKS}

    def _task(self, tasks) -> str:
        tasks = list(tasks)
        return self.rng.choices(tasks, [self.weights[t] for t in tasks])[0]

    def _pixels(self, images):
        enc = self.processor.image_processor(images, return_tensors="pt")
        return {"pixel_values": enc["pixel_values"], "image_sizes": enc["image_sizes"]}

    def text_batch(self, n: int):
        """Text-only conversations: text tasks, and image tasks about a scene described in words."""
        encoded = []
        for _ in range(n):
            task = self._task(synthetic.TASKS)
            first, turns = synthetic.training_turns(self.rng, task, self.args.max_turns, self._extra(),
                                                    self.args.min_turns if first_is_image(task) else 1)
            if first.scene is not None:
                turns = [(in_words(first.scene, turns[0][0]), turns[0][1])] + turns[1:]
            encoded.append(self.encoder.encode(turns, has_image=False))
        return (*collate(encoded, self.pad_id), {})

    def caption_batch(self, n: int):
        items = [synthetic.draw_item(self._task(synthetic.IMAGE_TASKS), "train", self.rng) for _ in range(n)]
        turns = [[(DESCRIBE, caption(it.scene))] for it in items]
        return self._image_inputs(items, turns)

    def image_batch(self, n: int):
        firsts, all_turns = [], []
        for _ in range(n):
            first, turns = synthetic.training_turns(self.rng, self._task(synthetic.IMAGE_TASKS), self.args.max_turns,
                                                    self._extra(), self.args.min_turns)
            firsts.append(first)
            all_turns.append(turns)
        return self._image_inputs(firsts, all_turns)

    def _image_inputs(self, items, all_turns):
        """Model inputs of image conversations, and their auxiliary targets in ``self.targets``."""
        encoded = [self.encoder.encode(turns, has_image=True) for turns in all_turns]
        present, counts = zip(*(scene_labels(it.scene) for it in items), strict=True)
        self.targets = {
            "patch": torch.stack([anyres_patch_labels(it, tiny_next.IMAGE_SIZE).flatten(0, 1) for it in items]),
            "present": torch.stack(present), "counts": torch.stack(counts),
            "referent": torch.cat([referent_labels(it.scene, turns) for it, turns in zip(items, all_turns, strict=True)])}
        return (*collate(encoded, self.pad_id), self._pixels([render(it) for it in items]))

    def _extra(self) -> dict[str, float]:
        return {t: self.weights[t] for t in synthetic.IMAGE_TASKS} | {"caption": self.args.caption_weight}

    def batches(self, stage: str, n: int) -> list:
        if stage == "text":
            return [self.text_batch(n)]
        if stage == "align":
            return [self.caption_batch(n)]
        return [self.image_batch(n), self.text_batch(self.args.batch_text)]


def first_is_image(task: str) -> bool:
    return task in synthetic.IMAGE_TASKS


def validate(model, processor, items: list[synthetic.Item], words: bool) -> dict:
    """Teacher-forced exact match and answer NLL per task: image questions with the 112 px image,
    or with the scene in words when ``words``."""
    was_training = model.training
    encoder = ConversationEncoder(processor.tokenizer, tiny_next.NUM_IMAGE_TOKENS)
    scores = teacher_forced_scores(
        model, processor, items, encoder,
        image_of=lambda it: None if it.scene is None or words else render(it),
        question_of=lambda it: in_words(it.scene, it.question) if it.scene is not None and words else it.question)
    model.train(was_training)
    return scores


def lr_at(step: int, progress: float, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Taps:
    """Forward hooks that keep the projector's output and two blocks' outputs of the last forward."""

    def __init__(self, model, layers):
        self.projected, self.blocks = None, {}
        model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: setattr(self, "projected", out))
        for number in set(layers):
            model.model.language_model.layers[number - 1].register_forward_hook(self._keep(number))

    def _keep(self, number):
        def hook(mod, inp, out):
            self.blocks[number] = out[0] if isinstance(out, tuple) else out
        return hook


def auxiliary_loss(stage: str, heads: AuxHeads, taps: Taps, targets: dict, starts, args) -> torch.Tensor:
    """The image batch's auxiliary losses (see the module docstring); starts: (B, L - 1) bool, the
    positions that predict each answer's first token."""
    batch = starts.shape[0]
    projected = taps.projected.reshape(batch, -1, taps.projected.shape[-1])  # the 5 crops of each image
    assert projected.shape[1] == targets["patch"].shape[1], "an image did not tile to the 112 x 112 pinpoint"
    text_hidden = taps.blocks[args.scene_layer][torch.arange(batch), starts.int().argmax(1)]
    loss = args.aux_weight * heads(projected, text_hidden, targets["patch"], targets["present"], targets["counts"])
    if stage == "instruct" and args.ref_weight > 0:
        turn_hidden = taps.blocks[args.ref_layer][:, :-1][starts]
        loss = loss + args.ref_weight * heads.referent_loss(turn_hidden, targets["referent"])
    return loss


def run_stage(stage: str, model, processor, data: Data, args, log, out: Path, heads: AuxHeads, taps: Taps) -> dict:
    index = list(tiny_next.STAGES).index(stage)
    minutes, lr, batch = args.minutes[index], args.lr[index], args.batch[index]
    trained = tiny_next.set_stage(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"[{stage}] training {sum(p.numel() for p in params):,} parameters in {len(trained)} tensors "
          f"for {minutes} min", flush=True)
    aux = stage != "text" and args.aux_weight > 0
    optimizer = torch.optim.AdamW(params + (list(heads.parameters()) if aux else []), lr=lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    val_items = [it for task in synthetic.TASKS
                 for it in synthetic.generate(task, "calibration", args.eval_per_task, seed=12345)]
    words = stage == "text"
    start, last_eval, t_log, step, running, running_aux, best = time.time(), time.time(), time.time(), 0, [], [], None

    def evaluate() -> dict:
        t0 = time.time()
        result = validate(model, processor, val_items, words)
        data.weights = {t: 0.2 + (1 - a) for t, a in result["accuracy"].items()}
        record = {"stage": stage, "step": step, "minutes": round((time.time() - start) / 60, 2), **result}
        log.write(json.dumps(record) + "\n")
        log.flush()
        per_task = " ".join(f"{t}={a:.2f}" for t, a in result["accuracy"].items())
        print(f"[{stage} eval] step {step} {record['minutes']:.1f} min avg {result['average']:.3f} | {per_task} "
              f"({time.time() - t0:.0f}s)", flush=True)
        return record

    while (time.time() - start) / 60 < minutes and (args.max_steps is None or step < args.max_steps):
        rate = lr_at(step, (time.time() - start) / 60 / minutes, lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = rate
        turn_losses, aux_loss = [], None
        for ids, labels, mask, images in data.batches(stage, batch):
            losses, _, _, turn, starts = answer_token_losses(model, ids, labels, mask, **images)
            turn_losses.append(per_turn_mean(losses, turn))
            if aux and images:
                aux_loss = auxiliary_loss(stage, heads, taps, data.targets, starts, args)
        loss = lm_loss = torch.cat(turn_losses).mean()
        if aux_loss is not None:
            loss = loss + aux_loss
            running_aux.append(aux_loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        running.append(lm_loss.item())
        if step % 25 == 0:
            aux_text = f" aux {sum(running_aux) / len(running_aux):.3f}" if running_aux else ""
            print(f"[{stage}] step {step} loss {sum(running) / len(running):.4f}{aux_text} lr {rate:.2e} "
                  f"{25 / (time.time() - t_log):.2f} steps/s", flush=True)
            running, running_aux, t_log = [], [], time.time()
        if time.time() - last_eval > args.eval_minutes * 60:
            record = evaluate()
            last_eval = time.time()
            if stage == "instruct" and (best is None or record["average"] > best["average"]):
                best = record
                save(model, processor, out / "best")
                (out / "best" / "validation.json").write_text(json.dumps(record, indent=1))
    record = evaluate()
    save(model, processor, out / stage)
    if stage == "instruct" and (best is None or record["average"] > best["average"]):
        save(model, processor, out / "best")
        (out / "best" / "validation.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None) -> int:
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    processor = tiny_next.build_processor()
    order = list(tiny_next.STAGES)
    first = order.index(args.stages[0])
    if first == 0:
        bundled = LlavaForConditionalGeneration.from_pretrained(tiny_vlm.bundled_model_dir(), dtype=torch.float32)
        model = tiny_next.build_model(processor.tokenizer, seed=args.seed, vision_from=bundled)
    else:
        model = LlavaNextForConditionalGeneration.from_pretrained(out / order[first - 1], dtype=torch.float32)
    data = Data(processor, args, random.Random(f"tiny-next|{args.seed}"))
    heads = AuxHeads(model.config.text_config.hidden_size)
    taps = Taps(model, (args.scene_layer, args.ref_layer))
    print(f"params {sum(p.numel() for p in model.parameters()):,}; args {vars(args)}", flush=True)
    t0 = time.time()
    with open(out / "eval_log.jsonl", "a") as log:
        for stage in args.stages:
            run_stage(stage, model, processor, data, args, log, out, heads, taps)
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
