"""Stage 1 of the real-LM LLaVA (:mod:`smollm2_llava`): the projector and ``image_newline`` alone,
SmolLM2-135M-Instruct and the CLIP tower frozen, on a 2-core CPU.

    # stage1-v1 (projector-stage1-v1.safetensors; the defaults)
    nice -n 10 python benchmarks/real_lm/train_llava.py --out OUT --steps 180 > OUT/train.log
    # stage1-v2 (projector.safetensors, the model card's): base view, fewer captions, word alignment
    nice -n 10 python benchmarks/real_lm/train_llava.py --out OUT --base-view-share 0.9 --caption-share 0.2 \
        --batch 8 --warmup 30 --word-weight 1.0 --steps 700 > OUT/train.log

``--out`` defaults to the shipped folder, whose ``projector.safetensors`` a run replaces: give
another folder to keep the shipped projector.

Data: 112 px scenes of the synthetic train split (``atv_sparse.tinybench.tasks``), one turn per
sample: half LLaVA stage-1 captions ("Describe the image." -> the ShareGPT4V-style caption), half
the tasks' image questions with their short answers, so that the projector's tokens also carry the
answer format (a frozen instruct LM otherwise answers in sentences, which exact match scores 0).
Samples are encoded by the evaluation's own path (``atv_sparse.evaluation.prompts.
teacher_forced_inputs``: chat template, processor, answer positions), so training sees exactly
the prompts the bench scores.

Base view only (``--base-view-share``, LLaVA-NeXT's own recipe: stage 1 at the base resolution,
anyres only later): a step drawn as a base-view step feeds each image as its base view alone (the
scene resized to one 56 px crop: 64 image tokens instead of the 336 of anyres), which is exactly
the first 64 image tokens of the anyres sequence the evaluation feeds (LLaVA-NeXT packs the base
view first, then the tiles with ``image_newline``), so the projector learns on the prefix the
bench reads, about 4x cheaper per sample. The other steps are anyres as before, so the tiles'
tokens and ``image_newline`` are trained too. The model is unchanged: same projector, anyres at
evaluation.

Loss: cross-entropy on the answer tokens and their ``<|im_end|>`` (each answer weighing the same),
plus the tiny models' training-only auxiliary heads (``atv_sparse.tinybench.supervision.AuxHeads``,
discarded after training; ``--aux-weight``): what every projected patch token of the 5 crops shows
and the scene summary, read from the projector's output and from block ``--scene-layer``'s hidden
state where the answer is predicted. Their gradients reach only the projector (nothing else trains).

The language model runs in bf16 (its checkpoint's dtype; about 1.4x faster than fp32 here), the
tower, projector and heads in fp32; AdamW (betas 0.9 / 0.98, weight decay 0.01), linear warm-up
and cosine to 5% over ``--steps`` (a step count, not wall time: a paused run only takes longer).
Every ``--save-every`` steps and at the end the trained tensors go to
``OUT/projector.safetensors`` (through a temporary file), so a run stopped early still leaves a
projector; at the end, teacher-forced exact match on ``--eval-per-task`` calibration-split items per
task (never the test split) goes to ``OUT/eval_log.jsonl``.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import smollm2_llava  # noqa: E402
from atv_sparse.evaluation.items import EvalItem  # noqa: E402
from atv_sparse.evaluation.prompts import teacher_forced_inputs  # noqa: E402
from atv_sparse.tinybench import next_model as tiny_next  # noqa: E402
from atv_sparse.tinybench import tasks as synthetic  # noqa: E402
from atv_sparse.tinybench.scenes import caption  # noqa: E402
from atv_sparse.tinybench.supervision import AuxHeads, anyres_patch_labels, scene_labels  # noqa: E402

DESCRIBE = "Describe the image."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=smollm2_llava.TRAINED, help="folder for projector.safetensors and logs")
    p.add_argument("--cache", type=Path, default=None, help="smollm2.py's cache folder")
    p.add_argument("--steps", type=int, default=180)
    p.add_argument("--batch", type=int, default=4, help="samples per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--caption-share", type=float, default=0.5, help="share of caption samples")
    p.add_argument("--base-view-share", type=float, default=0.0,
                   help="share of steps fed the base view alone (64 image tokens) instead of anyres (336)")
    p.add_argument("--log-name", default="eval_log.jsonl", help="file in --out the end-of-run validation is appended to")
    p.add_argument("--aux-weight", type=float, default=0.2,
                   help="weight of the auxiliary heads' loss (about 65 at the start, against 4 for the answers)")
    p.add_argument("--word-weight", type=float, default=0.0,
                   help="weight of the word-alignment loss (WordTargets: object patches towards the embeddings of "
                        "their colour and shape words)")
    p.add_argument("--scene-layer", type=int, default=8, help="block whose output feeds the scene-summary head")
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--eval-per-task", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def draw_samples(rng: random.Random, n: int, caption_share: float) -> list[tuple[synthetic.Item, EvalItem]]:
    """``n`` train-split samples: (the task item, its rendered single-turn sample)."""
    out = []
    for _ in range(n):
        item = synthetic.draw_item(rng.choice(list(synthetic.IMAGE_TASKS)), "train", rng)
        question, answer = ((DESCRIBE, caption(item.scene)) if rng.random() < caption_share
                            else (item.question, item.answer))
        image = item.scene.render(item.render_seed, size=tiny_next.IMAGE_SIZE)
        out.append((item, EvalItem(item.task, question, answer, image, item.key)))
    return out


class Taps:
    """Forward hooks keeping the projector's output and one block's output of the last forward."""

    def __init__(self, model, layer: int):
        self.projected = self.block = None
        model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: setattr(self, "projected", o))
        model.model.language_model.layers[layer - 1].register_forward_hook(
            lambda m, i, o: setattr(self, "block", o[0] if isinstance(o, tuple) else o))


def base_view_inputs(model, batch: dict, targets: list) -> tuple[dict, list]:
    """The anyres teacher-forced ``batch`` (``teacher_forced_inputs``: one image per row) cut to
    the base view: each row's image tokens keep their first 64 (the base view's, which LLaVA-NeXT
    packs first) and the language model's ``inputs_embeds`` get the projected base crop there.
    Returns (the language model's inputs: inputs_embeds (B, T', H), attention_mask (B, T')), the
    targets with their positions moved by the dropped tokens)."""
    image_id = model.config.image_token_index
    ids, mask = batch["input_ids"], batch["attention_mask"]
    is_image = ids == image_id
    n_image = is_image.sum(1)
    if not bool((n_image == n_image[0]).all()) or int(n_image[0]) <= tiny_next.TOKENS_PER_CROP:
        raise ValueError(f"expected one anyres image per row, got image-token counts {n_image.tolist()}")
    # keep every text token and the first TOKENS_PER_CROP image tokens of each row
    keep = ~is_image | (is_image.cumsum(1) <= tiny_next.TOKENS_PER_CROP)
    dropped = int(n_image[0]) - tiny_next.TOKENS_PER_CROP
    ids = ids[keep].view(ids.shape[0], -1)
    mask = mask[keep].view(ids.shape[0], -1)
    tower = model.model.vision_tower(batch["pixel_values"][:, 0].to(model.model.vision_tower.dtype),
                                     output_hidden_states=True)
    crop = tower.hidden_states[model.config.vision_feature_layer][:, 1:]  # "default": drop CLS
    projected = model.model.multi_modal_projector(crop)  # (B, 64, H)
    embeds = model.model.language_model.embed_tokens(ids)
    embeds = embeds.masked_scatter((ids == image_id).unsqueeze(-1), projected.to(embeds.dtype))
    return {"inputs_embeds": embeds, "attention_mask": mask}, [(i, start - dropped, t) for i, start, t in targets]


def step_loss(model, processor, heads, taps, samples, eos, aux_weight, base_view: bool = False,
              words: WordTargets | None = None) -> tuple[torch.Tensor, float, float, float]:
    """(total loss, answer loss, auxiliary loss, word-alignment loss) of one batch, anyres or
    ``base_view`` only."""
    batch, targets = teacher_forced_inputs(processor, [s for _, s in samples], eos)
    if base_view:
        inputs, targets = base_view_inputs(model, batch, targets)
        hidden = model.model.language_model(**inputs, use_cache=False).last_hidden_state
    else:
        hidden = model.model(**batch, use_cache=False).last_hidden_state
    rows = torch.tensor([i for i, start, t in targets for _ in t])
    cols = torch.tensor([start - 1 + k for i, start, t in targets for k in range(len(t))])
    goal = torch.tensor([tok for _, _, t in targets for tok in t])
    losses = F.cross_entropy(model.lm_head(hidden[rows, cols]).float(), goal, reduction="none")
    answer = torch.stack([losses[rows == i].mean() for i in range(len(samples))]).mean()
    if aux_weight == 0 and words is None:
        return answer, answer.item(), 0.0, 0.0
    items = [it for it, _ in samples]
    projected = taps.projected.float().reshape(len(samples), -1, taps.projected.shape[-1])
    patch = torch.stack([anyres_patch_labels(it, tiny_next.IMAGE_SIZE)[:1 if base_view else None].flatten(0, 1)
                         for it in items])
    total, aux, word = answer, torch.zeros(()), torch.zeros(())
    if aux_weight:
        present, counts = zip(*(scene_labels(it.scene) for it in items), strict=True)
        first = torch.tensor([start - 1 for _, start, _ in targets])
        text_hidden = taps.block[torch.arange(len(samples)), first].float()
        aux = heads(projected, text_hidden, patch, torch.stack(present), torch.stack(counts))
        total = total + aux_weight * aux
    if words is not None:
        word = words.loss(projected, patch)
        total = total + words.weight * word
    return total, answer.item(), aux.item(), word.item()


class WordTargets:
    """The word-alignment loss (``--word-weight``): each projected token of a patch showing an
    object is pulled towards SmolLM2's input embedding of the word naming it, the colour word
    (" red") on patches whose row + column is even and the shape word (" circle") on the others,
    so an object reads as "red circle red circle" to the frozen LM; a patch showing a letter of the
    scene's word, towards that letter (" A"). Empty patches are left to the answer loss. Every
    colour, shape and letter is one token of SmolLM2's vocabulary with its leading space."""

    def __init__(self, tokenizer, embeddings: torch.Tensor, weight: float):
        from atv_sparse.tinybench.supervision import COLOURS, SHAPES

        def ids(words):
            out = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
            if any(len(t) != 1 for t in out):
                raise ValueError(f"expected one token per word, got {dict(zip(words, out, strict=True))}")
            return [t[0] for t in out]

        table = embeddings.detach().float()
        self.colour = table[ids(COLOURS)]  # (8, H)
        self.shape = table[ids(SHAPES)]  # (3, H)
        self.letter = table[ids([chr(ord("A") + k) for k in range(26)])]  # (26, H)
        self.weight = weight

    def targets(self, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """patch: (..., 6) ``PATCH_CLASSES`` labels -> (target embeddings (..., H), mask (...) bool)."""
        colour, shape, letter = patch[..., 0], patch[..., 1], patch[..., 3]
        even = (patch[..., 4] + patch[..., 5]) % 2 == 0
        target = torch.zeros(*patch.shape[:-1], self.colour.shape[-1])
        on_object = colour > 0
        use_colour = on_object & even
        use_shape = on_object & ~even
        target[use_colour] = self.colour[colour[use_colour] - 1]
        target[use_shape] = self.shape[shape[use_shape] - 1]
        on_letter = (letter > 0) & ~on_object
        target[on_letter] = self.letter[letter[on_letter] - 1]
        return target, on_object | on_letter

    def loss(self, projected: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """Mean relative squared error ||p - e||^2 / ||e||^2 over the labelled tokens; projected
        (B, T, H), patch (B, T, 6)."""
        target, mask = self.targets(patch)
        if not bool(mask.any()):
            return projected.sum() * 0
        err = (projected[mask] - target[mask]).pow(2).sum(-1) / target[mask].pow(2).sum(-1)
        return err.mean()


@torch.no_grad()
def validate(model, processor, per_task: int) -> dict:
    """Teacher-forced exact match per task on calibration-split items (112 px scenes)."""
    from atv_sparse.evaluation.scoring import evaluate_model

    items = [EvalItem(it.task, it.question, it.answer,
                      None if it.scene is None else it.scene.render(it.render_seed, size=tiny_next.IMAGE_SIZE), it.key)
             for task in synthetic.TASKS for it in synthetic.generate(task, "calibration", per_task, seed=12345)]
    result = evaluate_model(model, processor, items, batch_size=8, progress=False)
    return {"accuracy": {t: s["accuracy"] for t, s in result["tasks"].items()}, "average": result["average"],
            "nll": {t: s["nll"] for t, s in result["tasks"].items()}}


def save_projector(model, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(smollm2_llava.trained_state(model), str(tmp))
    tmp.replace(path)


def main(argv=None) -> int:
    from smollm2 import ensure_checkpoint

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model, processor = smollm2_llava.build_model(ensure_checkpoint(args.cache), projector=None, seed=args.seed)
    model.model.language_model.to(torch.bfloat16)  # the tied lm_head with it
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters()) + [model.model.image_newline]
    for p in params:
        p.requires_grad_(True)
    heads = AuxHeads(model.config.text_config.hidden_size)
    taps = Taps(model, args.scene_layer)
    eos = {processor.tokenizer.eos_token_id}
    words = (WordTargets(processor.tokenizer, model.model.language_model.embed_tokens.weight, args.word_weight)
             if args.word_weight else None)
    optimizer = torch.optim.AdamW(params + list(heads.parameters()), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(f"smollm2-llava|{args.seed}")
    view_rng = random.Random(f"smollm2-llava-view|{args.seed}")  # its own stream: the samples stay the old run's
    print(f"training {sum(p.numel() for p in params):,} parameters (projector + image_newline) of "
          f"{sum(p.numel() for p in model.parameters()):,}; args {vars(args)}", flush=True)
    model.eval()
    model.model.multi_modal_projector.train()
    start = t_log = time.time()
    running, running_aux, running_word = [], [], []
    for step in range(args.steps):
        rate = args.lr * ((step + 1) / args.warmup if step < args.warmup
                          else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = rate
        base_view = args.base_view_share > 0 and view_rng.random() < args.base_view_share
        loss, answer, aux, word = step_loss(model, processor, heads, taps,
                                            draw_samples(rng, args.batch, args.caption_share), eos, args.aux_weight,
                                            base_view, words)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running.append(answer)
        running_aux.append(aux)
        running_word.append(word)
        if (step + 1) % 5 == 0:
            word_text = f"word {sum(running_word) / len(running_word):.3f} " if words is not None else ""
            print(f"step {step + 1} answer loss {sum(running) / len(running):.4f} aux {sum(running_aux) / len(running_aux):.3f} "
                  f"{word_text}lr {rate:.2e} {(time.time() - t_log) / len(running):.1f} s/step "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)
            running, running_aux, running_word, t_log = [], [], [], time.time()
        if (step + 1) % args.save_every == 0:
            save_projector(model, args.out / smollm2_llava.PROJECTOR_FILE)
    save_projector(model, args.out / smollm2_llava.PROJECTOR_FILE)
    minutes = (time.time() - start) / 60
    print(f"trained {args.steps} steps in {minutes:.1f} min; validating", flush=True)
    t0 = time.time()
    result = validate(model, processor, args.eval_per_task)
    record = {"stage": "align", "step": args.steps, "minutes": round(minutes, 2), "samples": args.steps * args.batch,
              "args": {k: str(v) for k, v in vars(args).items()}, **result}
    with open(args.out / args.log_name, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"validation ({args.eval_per_task} calibration items per task, {time.time() - t0:.0f} s): average "
          f"{result['average']:.3f} | " + " ".join(f"{t}={a:.2f}" for t, a in result["accuracy"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
