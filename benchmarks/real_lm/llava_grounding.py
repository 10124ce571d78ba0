"""Does the real-LM LLaVA's projector ground images? Teacher-forced answer NLL of calibration-split
image questions with each item's own image against the same question asked of another item's
image (same task), and the scale of the projected image tokens against SmolLM2's text embeddings.

    python benchmarks/real_lm/llava_grounding.py --projector benchmarks/real_lm/smollm2_llava/projector.safetensors

A projector whose tokens carry what the image shows makes the true image's answer likelier than a
wrong image's: the paired NLL gap (shuffled - true, nats per answer, summed over its tokens) is
positive. A gap of zero means the language model reads the image tokens as a soft prompt (answer
format, answer priors) and not as content. Scale: a frozen LM ignores image tokens much smaller
than its text embeddings, or is swamped by much larger ones, so the per-token L2 norms of both are
reported (projected base-view and tile tokens, ``image_newline``, the embeddings of the prompts'
text tokens and of the whole vocabulary).

``--caption-oracle``: the frozen LM's own ceiling. Each question is asked with its true image (the
projector's tokens still set the answer format) after the scene's exact description as text
("Image description: A yellow square at top centre-left and ...") against another item's
description: the gap then measures how much the language model can use perfect image content
handed to it in words, which no stage-1 projector (the LM frozen) can be expected to exceed by
much.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import smollm2_llava  # noqa: E402
from atv_sparse.evaluation.items import EvalItem  # noqa: E402
from atv_sparse.evaluation.scoring import evaluate_model  # noqa: E402
from atv_sparse.tinybench import next_model as tiny_next  # noqa: E402
from atv_sparse.tinybench import tasks as synthetic  # noqa: E402


def grounding_items(per_task: int, seed: int, split: str = "calibration") -> tuple[list[EvalItem], list[EvalItem]]:
    """(true, shuffled): ``per_task`` items of every image task (112 px scenes) and the same
    questions and answers with the image of the next item of the same task (a cyclic shift, so no
    item keeps its own image)."""
    if per_task < 2:
        raise SystemExit(f"error: --per-task {per_task}: a shuffled image needs at least 2 items per task")
    true, shuffled = [], []
    for task in synthetic.IMAGE_TASKS:
        items = synthetic.generate(task, split, per_task, seed=seed)
        images = [it.scene.render(it.render_seed, size=tiny_next.IMAGE_SIZE) for it in items]
        for k, it in enumerate(items):
            true.append(EvalItem(it.task, it.question, it.answer, images[k], it.key))
            shuffled.append(EvalItem(it.task, it.question, it.answer, images[(k + 1) % per_task], it.key))
    return true, shuffled


def caption_oracle_items(per_task: int, seed: int, split: str = "calibration") -> tuple[list[EvalItem], list[EvalItem]]:
    """(true, shuffled) as :func:`grounding_items`, every item with its own image, its question
    prefixed by its own scene's caption (true) or by the next item's (shuffled)."""
    from atv_sparse.tinybench.scenes import caption

    true, _ = grounding_items(per_task, seed, split)
    captions = [caption(it.scene) for task in synthetic.IMAGE_TASKS
                for it in synthetic.generate(task, split, per_task, seed=seed)]
    def ask(it, text):
        return EvalItem(it.task, f"Image description: {text}\n{it.question}", it.answer, it.image, it.key)

    shifted = [captions[(k // per_task) * per_task + (k % per_task + 1) % per_task] for k in range(len(true))]
    return ([ask(it, c) for it, c in zip(true, captions, strict=True)],
            [ask(it, c) for it, c in zip(true, shifted, strict=True)])


def nll_gap(true_records: list[dict], shuffled_records: list[dict]) -> dict:
    """Per task and overall: mean answer NLL and accuracy with the true and the shuffled image, and
    the paired NLL gap (shuffled - true) with its standard error over items."""
    def summary(pairs):
        gaps = [s["nll"] - t["nll"] for t, s in pairs]
        n = len(gaps)
        mean = sum(gaps) / n
        se = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (n - 1) / n) if n > 1 else float("nan")
        return {"n": n, "nll_true": sum(t["nll"] for t, _ in pairs) / n, "nll_shuffled": sum(s["nll"] for _, s in pairs) / n,
                "gap": mean, "gap_se": se, "acc_true": sum(t["correct"] for t, _ in pairs) / n,
                "acc_shuffled": sum(s["correct"] for _, s in pairs) / n}

    pairs = list(zip(true_records, shuffled_records, strict=True))
    tasks = {t: summary([p for p in pairs if p[0]["task"] == t]) for t in dict.fromkeys(r["task"] for r in true_records)}
    return {"overall": summary(pairs), "tasks": tasks}


@torch.no_grad()
def token_scale(model, processor, items: list[EvalItem]) -> dict:
    """Mean per-token L2 norms: projected image tokens of the base view and of the tiles,
    ``image_newline``, the input embeddings of the prompts' text tokens and of the vocabulary."""
    from atv_sparse.evaluation.prompts import chat_messages, process_batch

    seen = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    try:
        texts = [processor.apply_chat_template(chat_messages(it, True), tokenize=False) for it in items]
        batch = process_batch(processor, items, texts, "right")
        model.model(**batch, use_cache=False)
    finally:
        hook.remove()
    crops = seen["out"].float().reshape(len(items), -1, tiny_next.TOKENS_PER_CROP, seen["out"].shape[-1]).norm(dim=-1)
    embed = model.model.language_model.embed_tokens.weight.float()
    image_id = model.config.image_token_index
    text_ids = batch["input_ids"][(batch["attention_mask"] == 1) & (batch["input_ids"] != image_id)]
    return {"image_base": crops[:, 0].mean().item(), "image_tiles": crops[:, 1:].mean().item(),
            "image_newline": model.model.image_newline.float().norm().item(),
            "text_prompt_tokens": embed[text_ids].norm(dim=-1).mean().item(),
            "text_vocabulary": embed.norm(dim=-1).mean().item()}


def measure(model, processor, per_task: int, seed: int, caption_oracle: bool = False) -> dict:
    true, shuffled = (caption_oracle_items if caption_oracle else grounding_items)(per_task, seed)
    t0 = time.time()
    a = evaluate_model(model, processor, true, batch_size=8, progress=False)["records"]
    b = evaluate_model(model, processor, shuffled, batch_size=8, progress=False)["records"]
    return {"per_task": per_task, "seed": seed, "split": "calibration",
            "shuffled": "the scene's caption in the prompt" if caption_oracle else "the image", **nll_gap(a, b),
            "scale": token_scale(model, processor, true[::per_task]), "seconds": round(time.time() - t0, 1)}


def render(result: dict) -> str:
    o, s = result["overall"], result["scale"]
    lines = [f"overall ({o['n']} items): NLL true {o['nll_true']:.3f} shuffled {o['nll_shuffled']:.3f} gap "
             f"{o['gap']:+.3f} ± {o['gap_se']:.3f}; accuracy true {o['acc_true']:.3f} shuffled {o['acc_shuffled']:.3f}"]
    lines += [f"  {t:18s} NLL {v['nll_true']:6.3f} vs {v['nll_shuffled']:6.3f} gap {v['gap']:+.3f} ± {v['gap_se']:.3f}  "
              f"acc {v['acc_true']:.2f} vs {v['acc_shuffled']:.2f}" for t, v in result["tasks"].items()]
    lines.append("token L2 norms: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--projector", type=Path, default=smollm2_llava.TRAINED / smollm2_llava.PROJECTOR_FILE)
    p.add_argument("--cache", type=Path, default=None, help="smollm2.py's cache folder")
    p.add_argument("--per-task", type=int, default=6, help="calibration items per image task")
    p.add_argument("--seed", type=int, default=4321, help="item seed (not train_llava.py's validation seed 12345)")
    p.add_argument("--caption-oracle", action="store_true",
                   help="shuffle a text description of the scene put in the prompt, not the image (the LM's ceiling)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if not args.projector.is_file():
        raise SystemExit(f"error: {args.projector}: no such projector file")
    from smollm2 import ensure_checkpoint

    torch.set_num_threads(args.threads)
    model, processor = smollm2_llava.build_model(ensure_checkpoint(args.cache), args.projector, dtype=torch.bfloat16)
    from perplexity import machine  # the real-LM benchmarks' one record of machine and versions

    result = {"projector": str(args.projector), **measure(model, processor, args.per_task, args.seed, args.caption_oracle),
              "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/real_lm/llava_grounding.py " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:])}
    print(render(result), flush=True)
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
