"""Ship a trained tiny LLaVA-NeXT as ``atv_sparse/assets/tiny_next`` and write its model card.

    python benchmarks/tiny_next/export.py RUN/best

1. copies the model and processor files of CHECKPOINT (normally RUN/best of ``train.py``);
2. scores it on the synthetic test split (``--per-task`` items per task, seed ``--seed``, 112 px
   scenes, teacher-forced exact match) into ``test_scores.json``;
3. writes the model card ``README.md``: the model, the three training stages as they ran (from
   RUN/eval_log.jsonl), the default calibration's token mix, the modality-gap figures of both
   bundled models (``benchmarks/results/modality-gap-tiny{,-next}.json``, when present) and the
   test scores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from atv_sparse.evaluation.scorecard import record_test_scores
from atv_sparse.tinybench import next_model as tiny_next
from atv_sparse.tinybench.bundle import copy_checkpoint
from atv_sparse.evaluation.loading import model_dir_of

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"


def stage_records(run_dir: Path) -> dict[str, dict]:
    """stage -> its last validation record in RUN/eval_log.jsonl (the stage's end)."""
    records = {}
    log = run_dir / "eval_log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            records[r["stage"]] = r
    return records


def calibration_mix(model_dir: Path, nsamples: int = 32, seed: int = 0) -> dict:
    """Token mix of convert's default calibration set for this model (``nsamples`` conversations)."""
    from atv_sparse.calib import load_calibration
    from atv_sparse.models import adapter_for, read_config
    from atv_sparse.convert.preflight import check_processor
    from atv_sparse.tinybench.tasks import calibration_conversations

    adapter = adapter_for(read_config(model_dir), model_dir)
    return load_calibration(model_dir, adapter, nsamples=nsamples, seqlen=2048, seed=seed,
                            processor=check_processor(model_dir),
                            default_conversations=calibration_conversations).token_mix()


def gap_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    overlap = [g["overlap"] for g in r["linears"].values()]
    cosine = [g["cosine"] for g in r["linears"].values()]
    return {"overlap_mean": statistics.fmean(overlap), "overlap_min": min(overlap), "overlap_max": max(overlap),
            "cosine_min": min(cosine), "cosine_max": max(cosine), "visual_share": r["visual_share"],
            "block0_attn_cosine": r["blocks"]["0"]["q_proj"]["cosine"]}


def model_card(model, scores: dict, stages: dict, shipped: dict, mix: dict, gaps: dict, command: str) -> str:
    from atv_sparse.tinybench.tasks import describe_tasks

    text, vision = model.config.text_config, model.config.vision_config
    params = sum(p.numel() for p in model.parameters())
    describe = describe_tasks()
    rows = "\n".join(f"| {t} | {describe.get(t, '')} | {100 * s['accuracy']:.1f} | {s['nll']:.3f} | {s['n']} | "
                     f"{s['distinct']} |" for t, s in scores["tasks"].items())
    trains = {"text": "language model + LM head, from scratch, on text alone",
              "align": "projector + `image_newline` only (LLaVA stage 1); language model and vision tower frozen",
              "instruct": "projector + `image_newline` + language model + LM head (LLaVA stage 2); vision tower frozen"}
    stage_rows = "\n".join(
        f"| {s} | {trains[s]} | {r['minutes']:.0f} | {r['step']} | {100 * r['average']:.1f} |"
        for s, r in stages.items())
    weak = [f"{t} ({100 * s['accuracy']:.1f}%)" for t, s in scores["tasks"].items() if s["accuracy"] < 0.7]
    missed = ([f"the average is {100 * scores['average']:.1f}%"] if scores["average"] < 0.9 else []) + (
        [f"below 70%: {', '.join(weak)}"] if weak else [])
    verdict = ("The project's target for it (>= 90% average, no task below 70%) is **not reached** within the "
               f"~90 minute CPU budget: {'; '.join(missed)}. Pruning retention on tasks near chance (relation is a "
               "two-way choice; ocr is barely learned) carries little signal: read the per-task retention of the "
               "others, and the paired differences of accuracy."
               if missed else "The project's target for it (>= 90% average, no task below 70%) is reached.")
    best = (f"The shipped weights are the instruct stage's best validation: step {shipped['step']}, "
            f"{100 * shipped['average']:.1f}%." if shipped else "")
    gap_rows = "\n".join(
        f"| {name} | {100 * g['visual_share']:.1f}% | {100 * g['overlap_mean']:.1f}% ({100 * g['overlap_min']:.1f}-"
        f"{100 * g['overlap_max']:.1f}) | {g['cosine_min']:.3f}-{g['cosine_max']:.3f} | {g['block0_attn_cosine']:.3f} |"
        for name, g in gaps.items() if g)
    return f"""# atv-sparse tiny LLaVA-NeXT

The second bundled model of atv-sparse: a small `LlavaNextForConditionalGeneration` with anyres
tiling, **built the way the paper's models are built**: a language model pretrained on text alone,
then only the projector trained with the language model frozen (LLaVA stage 1), then instruction
tuning. Image tokens therefore enter its language model as foreign inputs, with their own
activation statistics, which is what token-selective calibration (ATV) is about; the first bundled
model (`tiny_vlm`) learned both kinds of token jointly from scratch. A benchmark instrument on the
synthetic tasks of `atv_sparse.tinybench.tasks`, not an assistant.

## Model

- `LlavaNextForConditionalGeneration`, {params:,} parameters, float32.
- Vision: CLIP, {vision.image_size} px crops, patch {vision.patch_size}, hidden {vision.hidden_size},
  {vision.num_hidden_layers} layers: the bundled tiny VLM's trained tower, copied in and frozen throughout.
- Anyres: grid pinpoints {tiny_next.GRID_PINPOINTS}; a {tiny_next.IMAGE_SIZE} px scene becomes a base view
  plus 2 x 2 tiles of {vision.image_size} px (5 crops), {tiny_next.NUM_IMAGE_TOKENS} image tokens
  (64 + 4 x 64 + 16 `image_newline`), against 15-60 text tokens per turn.
- Projector: 2-layer GELU MLP. Language model: Llama, hidden {text.hidden_size}, MLP
  {text.intermediate_size}, {text.num_hidden_layers} layers, {text.num_attention_heads} heads (same size and
  tokenizer as `tiny_vlm`; every decoder linear a multiple of 64 in both dimensions).

## Training

`{command}` (fixed seeds, one process, 2 threads on a 2-core CPU;
the log is `benchmarks/tiny_next/train.log`). Validation: teacher-forced exact match on 40
calibration-split items per task (never the test split).

| stage | trains | minutes | steps | validation average at its end, % |
| --- | --- | ---: | ---: | ---: |
{stage_rows}

The text stage is validated with each scene described in words (the only way a text-only model
can answer), the others with the images. {best}

Text stage inputs: the arithmetic and facts questions, and every image question asked about a
scene described in words. Align: 112 px scenes, "Describe the image." -> the caption. Instruct:
multi-turn conversations about train-split scenes plus text-only conversations. Loss on the
answers only; in the align and instruct stages also the training-only auxiliary heads of
`atv_sparse.tinybench.supervision` (per-patch contents of all 5 crops and the scene summary from
the projector's output and from block 3; in instruct the objects each question refers to, from
block 4). In the align stage their gradients reach only the projector and `image_newline`. The
instruct stage's checkpoint with the best validation average is shipped.

## Calibration token mix

`atv-sparse convert`'s default calibration on this model (32 conversations of the calibration
split, seed 0, scenes at {tiny_next.IMAGE_SIZE} px): {mix['visual']:,} image + {mix['text']:,} text tokens,
**{100 * mix['visual_share']:.1f}% visual** at block 0 (LLaVA-NeXT-8B with ShareGPT4V captions: about 90%).

## Modality gap, both bundled models

From `benchmarks/modality_gap.py` (96 default calibration conversations, seeds 0-2): Wanda 50% masks
scored from text-only vs visual-only statistics, share of kept weights in common (mean over the
42 decoder linears, range); cosine between the text and visual tokens' per-channel activation
RMS profiles at each linear's input (range; and at block 0's attention input).

| model | visual share | Wanda text vs visual overlap | RMS-profile cosine | block 0 attention input |
| --- | ---: | ---: | ---: | ---: |
{gap_rows}

## Test scores

Synthetic test split at {scores['image_size']} px, {scores['per_task']} items per task (seed {scores['seed']}),
teacher-forced exact match over the answer and its end-of-turn token, answer NLL in nats.

| task | mirrors | accuracy % | answer NLL | n | distinct |
| --- | --- | ---: | ---: | ---: | ---: |
{rows}
| **average** | | **{100 * scores['average']:.1f}** | {scores['average_nll']:.3f} | | |

{verdict}

`python -m atv_sparse.evaluate atv_sparse/assets/tiny_next` reproduces these numbers;
`tests/test_tiny_next.py` re-scores the first items of every task against `test_scores.json`.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint directory written by train.py (normally RUN/best)")
    p.add_argument("--per-task", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-command", default="python benchmarks/tiny_next/train.py",
                   help="the command that trained CHECKPOINT, for the model card")
    p.add_argument("--card-only", action="store_true", help="rewrite README.md from the shipped files and results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    src, dst = Path(args.checkpoint), model_dir_of("tiny-next")
    if args.card_only:
        from atv_sparse.evaluation.loading import load_model_and_processor

        model, scores = load_model_and_processor(dst)[0], json.loads((dst / "test_scores.json").read_text())
    else:
        copy_checkpoint(src, dst)
        model, scores = record_test_scores(dst, args.per_task, args.seed)
    gaps = {"tiny_vlm": gap_summary(RESULTS / "modality-gap-tiny.json"),
            "tiny_next": gap_summary(RESULTS / "modality-gap-tiny-next.json")}
    shipped = json.loads((src / "validation.json").read_text()) if (src / "validation.json").is_file() else {}
    card = model_card(model, scores, stage_records(src.parent), shipped, calibration_mix(dst), gaps,
                      args.train_command)
    (dst / "README.md").write_text(card)
    for task, s in scores["tasks"].items():
        print(f"{task:18s} {100 * s['accuracy']:5.1f}  nll {s['nll']:.3f}  n {s['n']}  distinct {s['distinct']}")
    print(f"average {100 * scores['average']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
