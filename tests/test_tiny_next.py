"""The tiny LLaVA-NeXT builder (atv_sparse.tinybench.next_model): anyres inputs through the real
LlavaNextProcessor path, and training stages that freeze what they say they freeze."""

import random

import pytest
import torch

from atv_sparse.tinybench import model as tiny_vlm
from atv_sparse.tinybench import next_model as tiny_next
from atv_sparse.tinybench import tasks as synthetic
from atv_sparse.tinybench.training import ConversationEncoder


@pytest.fixture(scope="module")
def processor():
    return tiny_next.build_processor()


@pytest.fixture(scope="module")
def model(processor):
    return tiny_next.build_model(processor.tokenizer, seed=0)


def _encode(processor, image, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


@pytest.mark.parametrize("task", ["attribute", "count", "ocr", "compose_colour"])
def test_synthetic_scene_tiles_into_five_crops(processor, model, task):
    item = synthetic.generate(task, "test", 1, seed=3)[0]
    image = item.scene.render(item.render_seed, size=tiny_next.IMAGE_SIZE)
    enc = _encode(processor, image, item.question)
    image_id = model.config.image_token_index
    assert tuple(enc["pixel_values"].shape) == (1, 5, 3, tiny_next.CROP_SIZE, tiny_next.CROP_SIZE)
    assert int((enc["input_ids"] == image_id).sum()) == tiny_next.NUM_IMAGE_TOKENS == 336
    with torch.no_grad():  # transformers checks that the features fill exactly the image tokens
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(56, 112), (112, 56), (90, 100), (168, 56)])
def test_other_aspect_ratios_fill_their_image_tokens(processor, model, size):
    enc = _encode(processor, synthetic.generate("attribute", "test", 1)[0].scene.render(0, size=56).resize(size),
                  "What colour is the circle?")
    with torch.no_grad():
        model(**enc)
    assert int((enc["input_ids"] == model.config.image_token_index).sum()) > tiny_next.TOKENS_PER_CROP


def test_vision_tower_copied_from_bundled_model(processor):
    from transformers import LlavaForConditionalGeneration

    bundled = LlavaForConditionalGeneration.from_pretrained(tiny_vlm.bundled_model_dir())
    model = tiny_next.build_model(processor.tokenizer, vision_from=bundled)
    theirs = bundled.model.vision_tower.state_dict()
    for name, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("stage", list(tiny_next.STAGES))
def test_stage_trains_exactly_its_groups(processor, stage):
    """One optimizer step per stage: frozen parameters are bit-identical afterwards, and every
    trained group moved."""
    model = tiny_next.build_model(processor.tokenizer, seed=1)
    trainable = set(tiny_next.set_stage(model, stage))
    groups = tiny_next.parameter_groups(model)
    for group, params in groups.items():
        for name, p in params:
            assert p.requires_grad == (group in tiny_next.STAGES[stage]), (stage, name)
            assert (name in trainable) == p.requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    rng = random.Random(f"stage|{stage}")
    item = synthetic.draw_item("attribute", "train", rng)
    if stage == "text":
        enc = processor.tokenizer(f"<s>USER: {item.question} ASSISTANT: {item.answer}</s>", return_tensors="pt",
                                  add_special_tokens=False)
    else:
        enc = _encode(processor, item.scene.render(item.render_seed, size=tiny_next.IMAGE_SIZE), item.question)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**enc, labels=enc["input_ids"]).loss
    loss.backward()
    opt.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    names = {id(p): n for n, p in model.named_parameters()}
    for group, params in groups.items():
        moved = {names[id(p)] for _, p in params} & changed
        if group in tiny_next.STAGES[stage]:
            assert moved, f"{stage}: nothing in {group} was updated"
        else:
            assert not moved, f"{stage}: frozen {group} changed: {sorted(moved)[:3]}"


def test_training_encoder_builds_the_processor_ids(processor):
    """The training script encodes conversations by hand (ConversationEncoder with 336 image
    tokens); the ids must be exactly what LlavaNextProcessor builds from the chat template."""
    encoder = ConversationEncoder(processor.tokenizer, tiny_next.NUM_IMAGE_TOKENS)
    rng = random.Random("encoder")
    for task in ("attribute", "ocr", "mcq"):
        item = synthetic.draw_item(task, "train", rng)
        ids, labels = encoder.encode([(item.question, item.answer)], has_image=True)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}]
        prompt = processor.apply_chat_template(messages)
        enc = processor(images=item.scene.render(item.render_seed, size=tiny_next.IMAGE_SIZE), text=prompt,
                        return_tensors="pt")
        assert enc["input_ids"][0].tolist() == ids.tolist(), task
        answer = processor.tokenizer(f" {item.answer}</s>", add_special_tokens=False)["input_ids"]
        assert labels[labels != -100].tolist() == answer


def test_default_calibration_is_mostly_visual(processor, model, tmp_path):
    """The embedded calibration set on the tiny LLaVA-NeXT: 112 px scenes (5 crops, 336 image tokens)
    against ShareGPT4V-like texts, so that at least 85% of every block's calibration tokens are
    visual, as with LLaVA-NeXT-8B's anyres images (the tiny LLaVA-1.5's share is 52-54%)."""
    from atv_sparse.calib import load_calibration
    from atv_sparse.models import adapter_for, read_config
    from atv_sparse.convert.preflight import check_processor

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    adapter = adapter_for(read_config(tmp_path), tmp_path)
    for seed in (0, 1, 2):
        mix = load_calibration(tmp_path, adapter, nsamples=32, seqlen=2048, seed=seed,
                               processor=check_processor(tmp_path),
                               default_conversations=synthetic.calibration_conversations).token_mix()
        assert mix["visual"] == 32 * tiny_next.NUM_IMAGE_TOKENS
        assert mix["visual_share"] >= 0.85, (seed, mix)


@pytest.mark.parametrize("case", ["empty image", "no image slot"])
def test_bad_calibration_records_name_the_record(processor, case):
    """As for the first model: a record the anyres path cannot use is an error naming the record."""
    from PIL import Image

    from atv_sparse.calib.multimodal import Conversation, build_sample
    from atv_sparse.errors import AtvSparseError

    image = Image.new("RGB", (0, 0)) if case == "empty image" else Image.new("RGB", (112, 112))
    if case == "no image slot":
        processor = tiny_next.build_processor()
        processor.chat_template = "{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}"
    conv = Conversation(image=image, turns=[("user", "Describe the image."), ("assistant", "A red circle.")],
                        source="data.jsonl line 7")
    with pytest.raises(AtvSparseError, match="calibration data.jsonl line 7: "):
        build_sample(processor, conv, processor.tokenizer.convert_tokens_to_ids("<image>"))


# The shipped model (atv_sparse/assets/tiny_next, trained by benchmarks/tiny_next/train.py).
REPRO_PER_TASK = 12


def test_bundled_next_model_reproduces_its_reported_accuracy():
    """The first 12 items per task of the model card's evaluation (500 per task, seed 0, 112 px
    scenes) are scored again through the real LlavaNextProcessor and compared item by item with the
    stored results; only float32 summation order differs between machines (allow 2 of 132)."""
    from stored_scores import rescore_first_items

    from atv_sparse.evaluation.items import scene_size
    from atv_sparse.evaluation.loading import model_dir_of

    bundled = model_dir_of("tiny-next")
    scores, mismatches, model, proc = rescore_first_items(bundled, REPRO_PER_TASK)
    assert scores["image_size"] == tiny_next.IMAGE_SIZE
    assert type(model).__name__ == "LlavaNextForConditionalGeneration" and scene_size(proc) == tiny_next.IMAGE_SIZE
    assert mismatches <= 2
    card = (bundled / "README.md").read_text()
    assert f"**{100 * scores['average']:.1f}**" in card


def test_bundled_next_model_calibrates_mostly_visual():
    """convert's default calibration on the shipped model: >= 85% of block 0's tokens visual."""
    from atv_sparse.calib import load_calibration
    from atv_sparse.models import adapter_for, read_config
    from atv_sparse.convert.preflight import check_processor
    from atv_sparse.evaluation.loading import model_dir_of

    bundled = model_dir_of("tiny-next")
    mix = load_calibration(bundled, adapter_for(read_config(bundled), bundled), nsamples=32, seqlen=2048, seed=0,
                           processor=check_processor(bundled), default_conversations=synthetic.calibration_conversations).token_mix()
    assert mix["visual_share"] >= 0.85, mix
