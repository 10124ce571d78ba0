"""One pruned and scored model per :class:`Job`, in worker processes, and the run log of finished ones.

``setup`` loads the dense model once (both variants, the calibration sets per seed, the prepared
items) into ``STATE``; forked workers inherit it and run ``run_job``. ``RunLog`` appends every
finished run to a JSON-lines file keyed by ``run_key`` (the checkpoint's bytes and the scoring
settings), so a later invocation prunes only what is new.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from accuracy_plan import OUTLIER_CHANNELS, OUTLIER_SCALE, Job


# The worker side: one process holds the dense models, the calibration samples and the items.
STATE: dict = {}


def setup(args, score: bool = True) -> dict:
    """Load the model, build both variants, the calibration samples per seed and (``score``) the
    scored items."""
    from atv_sparse.analysis.outliers import add_outlier_channels
    from atv_sparse.evaluation.items import scene_size, synthetic_items
    from atv_sparse.evaluation.loading import load_model_and_processor
    from atv_sparse.evaluation.scoring import cache_decoder_inputs, prepare_items
    from atv_sparse.models import adapter_for, read_config

    model_dir = Path(args.model)
    model, processor = load_model_and_processor(model_dir, dtype=torch.float32)
    adapter = adapter_for(read_config(model_dir), model_dir)
    outlier = copy.deepcopy(model)
    transform = add_outlier_channels(outlier, OUTLIER_CHANNELS, OUTLIER_SCALE, seed=0)
    token_id = model.config.image_token_id
    calib = calibration_sets(processor, token_id, args.nsamples, args.seeds)
    first = next(iter(calib.values()))
    state = {"models": {"plain": model, "outlier": outlier}, "processor": processor, "adapter": adapter,
             "image_tokens": first.token_mix()["visual"] // len(first.samples),  # one image per conversation
             "calib": calib, "outlier_channels": transform.channels}
    if score:
        items = synthetic_items(args.per_task, seed=args.test_seed, size=scene_size(processor))
        state["prepared"] = prepare_items(model, processor, items)
        state["decoder_inputs"] = cache_decoder_inputs(model, state["prepared"])
    return state


def calibration_sets(processor, token_id: int, nsamples: int, seeds) -> dict:
    """seed -> the ``CalibrationSet`` of ``nsamples`` conversations of the synthetic calibration split
    (scenes drawn at the model's :func:`scene_size`, as ``convert``'s default calibration draws them)."""
    from atv_sparse.calib import conversation_calibration
    from atv_sparse.evaluation.items import scene_size
    from atv_sparse.tinybench.tasks import calibration_conversations

    size = scene_size(processor)
    return {seed: conversation_calibration(
        processor, calibration_conversations(nsamples, seed, size=size), token_id)
        for seed in seeds}


def calibration_token_mix(args) -> dict[str, dict]:
    """seed -> the calibration set's token mix (``CalibrationSet.token_mix``), without pruning anything."""
    from atv_sparse.models.processors import load_processor
    from transformers import AutoConfig

    sets = calibration_sets(load_processor(Path(args.model)), AutoConfig.from_pretrained(args.model).image_token_id,
                            args.nsamples, args.seeds)
    return {str(seed): c.token_mix() for seed, c in sets.items()}


def init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def parse_label(label: str):
    from atv_sparse.patterns import parse_pattern

    if label.endswith("%"):
        return parse_pattern("unstructured", float(label[:-1]) / 100)
    return parse_pattern(label)


@torch.no_grad()
def run_job(job: Job) -> dict:
    """Prune a fresh copy of the job's dense model and score it: per task accuracy, NLL and the
    per-item correctness (a 0/1 string in item order) and answer NLL, closed-choice accuracy where
    the prepared items carry choices, plus the driver's per-block report."""
    from atv_sparse.evaluation.scoring import evaluate_model

    st = STATE
    t0 = time.perf_counter()
    model = copy.deepcopy(st["models"][job.variant])
    calibration = st["calib"][job.seed] if job.seed is not None else None
    blocks = []
    pattern = None if job.pattern == "dense" else parse_label(job.pattern)  # None: the dense baseline
    if pattern is not None and job.mot is not None:
        from atv_sparse.analysis.mot import attach_mot, mot_prune

        probe = attach_mot(model)
        report = mot_prune(probe, calibration.samples, pathway=job.mot[0], calib=job.mot[1], pattern=pattern,
                           device="cpu")
        blocks = report.blocks
    elif pattern is not None:
        from atv_sparse.prune.pipeline import prune_model
        from atv_sparse.prune.recipe import PruneRecipe
        from atv_sparse.prune.targets import resolve_targets

        adapter = st["adapter"]
        layers, prefix = adapter.decoder_layers(model), adapter.layers_prefix(model)
        plan = resolve_targets(model, prefix, pattern)
        targets = {name: model.get_submodule(name) for name in plan.targets}
        # Every score rule is also a method's name; the job's selector replaces (or is) its own.
        recipe = PruneRecipe.build(job.score, pattern, calib_tokens=job.tokens, alpha=job.alpha, seed=job.seed or 0)
        result = prune_model(model, layers, prefix, targets, recipe, calibration, torch.device("cpu"), progress=False)
        blocks = result.blocks
    t1 = time.perf_counter()
    # Only decoder linears are pruned (and the outlier transform touches only decoder blocks), so
    # every run shares the dense model's embeddings and image features; the MoT probe routes by ids.
    items = st["prepared"] if job.mot is not None else st["decoder_inputs"]
    scored = evaluate_model(model, st["processor"], items, progress=False)
    correct: dict[str, list[str]] = {}
    choice: dict[str, list[str]] = {}
    nll: dict[str, list[float]] = {}
    for r in scored["records"]:
        correct.setdefault(r["task"], []).append("1" if r["correct"] else "0")
        nll.setdefault(r["task"], []).append(round(r["nll"], 4))
        if "choice_correct" in r:
            choice.setdefault(r["task"], []).append("1" if r["choice_correct"] else "0")
    eval_s = round(time.perf_counter() - t1, 2)
    # A further measure of the pruned model (the real-LM LLaVA's text perplexity), set by the caller.
    extra = st["measure"](model) if "measure" in st else {}
    return {**extra, "job": dataclasses.asdict(job), "name": job.name(), "average": scored["average"],
            "average_nll": scored["average_nll"],
            "tasks": {t: {k: s[k] for k in ("accuracy", "nll", "choice_accuracy") if k in s}
                      for t, s in scored["tasks"].items()},
            "correct": {t: "".join(c) for t, c in correct.items()},
            # Closed-choice correctness and answer NLL per item (item order), for paired differences;
            # "choice" only where the prepared items carry closed choices.
            **({"average_choice": scored["average_choice"], "choice": {t: "".join(c) for t, c in choice.items()}}
               if choice else {}),
            "nll_items": nll,
            "blocks": [{k: v for k, v in b.items() if not k.startswith("time_")} for b in blocks],
            "prune_s": round(t1 - t0, 2), "eval_s": eval_s}


class RunLog:
    """Finished runs of one setting, one JSON line each (``{"key": ..., "run": ...}``), appended as
    they finish. Lines of another key (another checkpoint or item count) are kept and ignored; a
    line cut short by a killed run is skipped."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key

    def load(self) -> dict[str, dict]:
        """Job name -> run, for the runs of this key."""
        runs = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry.get("key") == self.key:
                    runs[entry["run"]["name"]] = entry["run"]
        return runs

    def append(self, run: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # a line cut short by a killed run stays on its own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps({"key": self.key, "run": run}) + "\n").encode())


def run_key(args) -> dict:
    """What a logged run depends on besides its job: the checkpoint's weights and the items scored."""
    digest = hashlib.sha256()
    for f in sorted(Path(args.model).glob("*.safetensors")):
        digest.update(f.read_bytes())
    return {"weights_sha256": digest.hexdigest()[:16], "per_task": args.per_task, "nsamples": args.nsamples,
            "test_seed": args.test_seed}

