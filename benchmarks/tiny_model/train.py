"""Train the bundled tiny VLM (atv_sparse/assets/tiny_vlm) on the synthetic tasks, on a CPU.

    python benchmarks/tiny_model/train.py --out benchmarks/tiny_model/run   # the shipped recipe, 78 min

Recipe (fixed seeds; one process, ``--threads`` torch threads):
- model, tokenizer and processor from ``atv_sparse.tinybench.model`` (untrained, ``--seed``);
- each step: ``--batch-image`` multi-turn conversations about one image each (the first turn is
  a train-split item of a task drawn with the current task weights, then ``--min-turns - 1`` to
  ``--max-turns - 1`` more questions or a caption about the same image: extra answers cost a few
  tokens each against 64 image tokens per conversation) and ``--batch-text`` text-only
  conversations (arithmetic and facts questions); loss = cross-entropy on the answers and their
  EOS only, summed over both batches and divided by the number of answer tokens;
- an auxiliary loss (``--aux-weight``) on the projected image features, through three linear
  heads used only during training (they are not part of the saved model): per patch, the colour
  and shape of the object covering it and the letter of the word drawn there (from
  ``Scene.label_map``, the same geometry as the pixels); and, on the mean of the 64 patch
  features, which colour-shape pairs are present, how many shapes there are and which word is
  written, and the colour and shape in every grid cell (the mean is what a language model
  attending uniformly reads); and the same scene summary from the language model's hidden state
  after block ``--scene-layer`` at the position that predicts the first answer. Without them the
  language model ignored the image for the first 1,000+ steps (visual tasks at chance, text
  tasks learned) while the image tokens collapsed onto one large shared vector;
- a referent loss (``--ref-weight``): from the hidden state after block ``--ref-layer`` at the
  token that predicts each answer, the cell, colour and shape of the objects the question is
  about (``referents``). Without it the questions that must find one object among several
  (attribute, relation, hard negatives, compositional colour) stayed at 40-70% after 75 minutes
  while counting reached 98%; with it they were at 67-85% after 35;
- AdamW (betas 0.9 / 0.98, weight decay 0.01), linear warm-up then cosine to 5% of ``--lr``
  over ``--steps`` or ``--max-minutes``, whichever ends first; the vision tower and projector
  at ``--vision-lr-scale`` times that; gradient clipping at 1.0;
- every ``--eval-minutes``: teacher-forced exact match (answer + EOS, the scorer of
  ``atv_sparse.evaluation.scoring``) on ``--eval-per-task`` held-out items per task from the calibration
  split (never the test split), logged per task; the task weights become
  ``0.2 + (1 - accuracy)``, so the tasks the model gets wrong are drawn more often; the model,
  optimizer and RNG states are saved to OUT/checkpoint (``--resume`` continues from there),
  the best validation average to OUT/best;
- stops after ``--steps`` or ``--max-minutes`` of wall time, whichever comes first.
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

# On a shared CPU, spinning OpenMP workers make 2 threads ~7x slower than 1 (measured: 10 s vs
# 1.3 s per step under a load of 4); passive waiting keeps 2 threads at worst close to 1.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from atv_sparse.tinybench import model as tiny_vlm  # noqa: E402
from atv_sparse.tinybench import tasks as synthetic  # noqa: E402
from atv_sparse.tinybench.supervision import (AuxHeads, patch_labels, referent_labels,  # noqa: E402
                                              scene_labels)
from atv_sparse.tinybench.training import (ConversationEncoder, answer_token_losses, collate,  # noqa: E402
                                           per_turn_mean, save, teacher_forced_scores)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="benchmarks/tiny_model/run", help="output directory")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps (sets the LR schedule)")
    p.add_argument("--max-minutes", type=float, default=78.0, help="wall-time cap, minutes")
    p.add_argument("--batch-image", type=int, default=32, help="image conversations per step")
    p.add_argument("--batch-text", type=int, default=12, help="text-only conversations per step")
    p.add_argument("--max-turns", type=int, default=8, help="question / answer turns per conversation, at most")
    p.add_argument("--min-turns", type=int, default=6,
                   help="turns per image conversation, at least (more answers per image forward)")
    p.add_argument("--caption-weight", type=float, default=0.1,
                   help="weight of a caption turn among the extra turns (image tasks weigh 0.2-1.2 each)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--vision-lr-scale", type=float, default=0.5,
                   help="learning rate of the vision tower and projector, relative to --lr")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the auxiliary image losses")
    p.add_argument("--scene-layer", type=int, default=3,
                   help="the language-model block whose output feeds the scene-summary auxiliary head")
    p.add_argument("--ref-weight", type=float, default=0.5,
                   help="weight of the auxiliary loss on the objects each question refers to")
    p.add_argument("--ref-layer", type=int, default=4,
                   help="the language-model block whose output feeds the referent auxiliary head")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--eval-minutes", type=float, default=5.0, help="validation / checkpoint interval")
    p.add_argument("--eval-per-task", type=int, default=60, help="validation items per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    return p.parse_args(argv)


def lr_at(step: int, minutes: float, args) -> float:
    """Warm-up, then cosine to 5% over whichever ends first: ``--steps`` or ``--max-minutes``
    (on a shared machine the step rate varies; the schedule still ends when the time does)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = max((step - args.warmup) / max(1, args.steps - args.warmup), minutes / args.max_minutes)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Batcher:
    """Draws training conversations and turns them into model inputs."""

    def __init__(self, processor, args, rng: random.Random):
        self.processor, self.args, self.rng = processor, args, rng
        self.encoder = ConversationEncoder(processor.tokenizer)
        self.pad_id = processor.tokenizer.pad_token_id
        self.weights = {task: 1.0 for task in synthetic.TASKS}
        self._pool: list = []

    POOL = 8

    def image_batch(self):
        """The next image batch. Conversations are drawn ``POOL`` batches at a time and sorted by
        length, so a batch holds similar lengths (padding would otherwise cost ~30%)."""
        if not self._pool:
            tasks = list(synthetic.IMAGE_TASKS)
            extra = {t: self.weights[t] for t in tasks} | {"caption": self.args.caption_weight}
            drawn = []
            for _ in range(self.POOL * self.args.batch_image):
                task = self.rng.choices(tasks, [self.weights[t] for t in tasks])[0]
                first, turns = synthetic.training_turns(self.rng, task, self.args.max_turns, extra,
                                                        self.args.min_turns)
                drawn.append((self.encoder.encode(turns, has_image=True), first, referent_labels(first.scene, turns)))
            drawn.sort(key=lambda d: len(d[0][0]))
            b = self.args.batch_image
            self._pool = [drawn[i:i + b] for i in range(0, len(drawn), b)]
            self.rng.shuffle(self._pool)
        chunk = self._pool.pop()
        pixel_values = self.processor.image_processor([first.image() for _, first, _ in chunk],
                                                      return_tensors="pt")["pixel_values"]
        self.last_patch_labels = torch.stack([patch_labels(first) for _, first, _ in chunk])
        present, counts = zip(*(scene_labels(first.scene) for _, first, _ in chunk), strict=True)
        self.last_scene_labels = torch.stack(present), torch.stack(counts)
        self.last_referent_labels = torch.cat([refs for _, _, refs in chunk])
        return (*collate([enc for enc, _, _ in chunk], self.pad_id), pixel_values)

    def text_batch(self):
        tasks = list(synthetic.TEXT_TASKS)
        encoded = []
        for _ in range(self.args.batch_text):
            task = self.rng.choices(tasks, [self.weights[t] for t in tasks])[0]
            _, turns = synthetic.training_turns(self.rng, task, self.args.max_turns, {})
            encoded.append(self.encoder.encode(turns, has_image=False))
        return (*collate(encoded, self.pad_id), None)


def validate(model, processor, items: list[synthetic.Item], batch_size: int = 64) -> dict:
    """Teacher-forced exact match and mean answer NLL per task on single-turn ``items``."""
    scores = teacher_forced_scores(model, processor, items, ConversationEncoder(processor.tokenizer),
                                   lambda it: it.image(), lambda it: it.question, batch_size)
    result = {**scores, **image_feature_stats(model, processor, items)}
    model.train()
    return result


@torch.no_grad()
def image_feature_stats(model, processor, items: list[synthetic.Item]) -> dict:
    """How much the projected image features vary between images, relative to their common part
    (a collapse of the image tokens to one large shared vector shows up here first)."""
    images = [it.image() for it in items if it.scene is not None][:32]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    feats = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default")
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    feats = feats.reshape(len(images), -1, feats.shape[-1])
    common = feats.mean(0, keepdim=True)
    return {"image_feature_norm": float(common.norm(dim=-1).mean()),
            "image_feature_spread": float((feats - common).norm(dim=-1).mean())}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_time = time.time()
    processor = tiny_vlm.build_processor()
    ckpt = out / "checkpoint"
    if args.resume:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
        state = torch.load(out / "trainer_state.pt", weights_only=False)
    else:
        model, state = tiny_vlm.build_model(processor.tokenizer, seed=args.seed), None
    model.train()
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    ids = {id(p) for p in vision}
    aux_heads = AuxHeads(model.config.text_config.hidden_size)
    projected = []
    model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: projected.append(out))
    block_out: dict[int, torch.Tensor] = {}  # block number (1-based) -> its output of the last forward

    def keep(number):
        def hook(mod, inp, out):
            block_out[number] = out[0] if isinstance(out, tuple) else out
        return hook

    for number in {args.scene_layer, args.ref_layer}:
        model.model.language_model.layers[number - 1].register_forward_hook(keep(number))
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids] + list(aux_heads.parameters()),
               "scale": 1.0},
              {"params": vision, "scale": args.vision_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    batcher = Batcher(processor, args, random.Random(f"train|{args.seed}"))
    step, best, elapsed_before = 0, -1.0, 0.0
    torch.manual_seed(args.seed)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        aux_heads.load_state_dict(state["aux_heads"])
        batcher.rng.setstate(state["data_rng"])
        batcher.weights = state["weights"]
        torch.set_rng_state(state["torch_rng"])
        step, best, elapsed_before = state["step"], state["best"], state["elapsed"]
    val_items = [it for task in synthetic.TASKS
                 for it in synthetic.generate(task, "calibration", args.eval_per_task, seed=12345)]
    log = open(out / "eval_log.jsonl", "a")
    print(f"params {sum(p.numel() for p in model.parameters()):,}; args {vars(args)}", flush=True)

    def evaluate_and_save(final: bool = False) -> None:
        nonlocal best
        t0 = time.time()
        result = validate(model, processor, val_items)
        minutes = (elapsed_before + time.time() - start_time) / 60
        batcher.weights = {t: 0.2 + (1 - a) for t, a in result["accuracy"].items()}
        record = {"step": step, "minutes": round(minutes, 2), **result}
        log.write(json.dumps(record) + "\n")
        log.flush()
        per_task = " ".join(f"{t}={a:.2f}" for t, a in result["accuracy"].items())
        print(f"[eval] step {step} {minutes:.1f} min avg {result['average']:.3f} | {per_task} | image features "
              f"common {result['image_feature_norm']:.2f} spread {result['image_feature_spread']:.2f} "
              f"({time.time() - t0:.0f}s)", flush=True)
        save(model, processor, ckpt)
        torch.save({"optimizer": optimizer.state_dict(), "aux_heads": aux_heads.state_dict(),
                    "data_rng": batcher.rng.getstate(),
                    "weights": batcher.weights, "torch_rng": torch.get_rng_state(), "step": step,
                    "best": max(best, result["average"]), "elapsed": minutes * 60}, out / "trainer_state.pt")
        if result["average"] > best:
            best = result["average"]
            save(model, processor, out / "best")
            (out / "best" / "validation.json").write_text(json.dumps(record, indent=1))

    last_eval, running, running_aux, running_ref, t_log = time.time(), [], [], [], time.time()
    while step < args.steps:
        if (elapsed_before + time.time() - start_time) / 60 > args.max_minutes:
            print(f"wall-time cap of {args.max_minutes} min reached at step {step}", flush=True)
            break
        lr = lr_at(step, (elapsed_before + time.time() - start_time) / 60, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        turn_losses, text_hidden, turn_hidden = [], None, None
        projected.clear()
        for batch in (batcher.image_batch(), batcher.text_batch()):
            ids, labels, mask, pixels = batch
            losses, _, _, turn, starts = answer_token_losses(model, ids, labels, mask, pixels)
            turn_losses.append(per_turn_mean(losses, turn))
            if text_hidden is None:  # the image batch
                text_hidden = block_out[args.scene_layer][torch.arange(len(ids)), starts.int().argmax(1)]
                turn_hidden = block_out[args.ref_layer][:, :-1][starts]
        loss = lm_loss = torch.cat(turn_losses).mean()
        if args.aux_weight > 0:
            aux = aux_heads(projected[0], text_hidden, batcher.last_patch_labels, *batcher.last_scene_labels)
            running_aux.append(aux.item())
            loss = loss + args.aux_weight * aux
        if args.ref_weight > 0:
            ref = aux_heads.referent_loss(turn_hidden, batcher.last_referent_labels)
            running_ref.append(ref.item())
            loss = loss + args.ref_weight * ref
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        running.append(lm_loss.item())
        if step % 50 == 0:
            rate = 50 / (time.time() - t_log)
            t_log = time.time()
            aux_text = f" aux {sum(running_aux) / len(running_aux):.3f}" if running_aux else ""
            aux_text += f" ref {sum(running_ref) / len(running_ref):.3f}" if running_ref else ""
            print(f"step {step} loss {sum(running) / len(running):.4f}{aux_text} lr {lr:.2e} "
                  f"{rate:.2f} steps/s", flush=True)
            running, running_aux, running_ref = [], [], []
        if time.time() - last_eval > args.eval_minutes * 60:
            evaluate_and_save()
            last_eval = time.time()
    evaluate_and_save(final=True)
    save(model, processor, out / "final")
    print(f"done: step {step}, best validation average {best:.3f}, "
          f"{(elapsed_before + time.time() - start_time) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
