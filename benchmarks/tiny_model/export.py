"""Ship a trained checkpoint as the bundled tiny VLM and record its test scores.

    python benchmarks/tiny_model/export.py RUN_DIR/best

1. copies the model and processor files of CHECKPOINT into ``atv_sparse/assets/tiny_vlm/``
   (the model card README.md there is kept);
2. scores it with ``atv_sparse.evaluate`` on the synthetic test split (``--per-task`` items per
   task, ``--seed``; teacher-forced exact match) and writes ``test_scores.json`` beside it:
   per task the accuracy, answer NLL, item and distinct-item counts, and the per-item
   correctness as a string of 0/1 in item order (``tests/test_tiny_vlm.py`` re-scores a prefix
   of the items and compares them one by one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from atv_sparse.evaluate import evaluate_model, load_model_and_processor, synthetic_items
from atv_sparse.tiny_vlm import bundled_model_dir

FILES = ("config.json", "generation_config.json", "model.safetensors", "chat_template.jinja", "processor_config.json",
         "tokenizer.json", "tokenizer_config.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint directory written by train.py (e.g. RUN/best)")
    p.add_argument("--per-task", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    src, dst = Path(args.checkpoint), bundled_model_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    model, processor = load_model_and_processor(dst)
    items = synthetic_items(args.per_task, args.seed)
    t0 = time.time()
    result = evaluate_model(model, processor, items, progress=False)
    seconds = time.time() - t0
    tasks = {}
    for task, s in result["tasks"].items():
        correct = "".join("1" if r["correct"] else "0" for r in result["records"] if r["task"] == task)
        tasks[task] = {**s, "correct": correct}
    scores = {"per_task": args.per_task, "seed": args.seed, "scorer": "teacher-forced", "average": result["average"],
              "average_nll": result["average_nll"], "eval_seconds": round(seconds, 1), "tasks": tasks}
    (dst / "test_scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    for task, s in tasks.items():
        print(f"{task:18s} {100 * s['accuracy']:5.1f}  nll {s['nll']:.3f}  n {s['n']}  distinct {s['distinct']}")
    print(f"average {100 * result['average']:.2f} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
