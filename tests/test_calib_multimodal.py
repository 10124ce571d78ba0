"""Multimodal calibration: file formats, their errors, the synthetic set, and processed samples that
every tiny LVLM family consumes (image tokens in the text == image features the model inserts)."""

import importlib.util
import json
import shutil

import pytest
import torch
import transformers
from PIL import Image
from transformers import ProcessorMixin

from atv_sparse.calib.multimodal import Conversation, build_sample, read_multimodal_file
from atv_sparse.tinybench.tasks import calibration_conversations
from atv_sparse.errors import AtvSparseError
from atv_sparse.models.processors import (IMAGE_ONLY_PROCESSORS, load_processor,
                                          register_image_only_processors)

from atv_sparse.tinybench.families import ARCHITECTURES, FAMILIES, write_tiny_vlm

# Image tokens for one 96 x 96 synthetic image (measured; tiny-models.md section 3 explains them):
# LLaVA-1.5: 4 x 4 patches of the 56 px crop = 16.
# NeXT: 2 x 2 base + the 56 x 56 pinpoint as 2 x 2 tiles of 2 x 2 = 16, + 4 row newlines = 24.
# OneVision: 2 x 2 base + the 84 x 84 pinpoint, 3 x 3 tiles of 2 x 2 = 36, + 6 row newlines = 46.
# Qwen: smart_resize to 84 x 84 = 6 x 6 patches of 14, merged 2 x 2 = 9.
EXPECTED_IMAGE_TOKENS = {"llava": 16, "llava_next": 24, "llava_onevision": 46, "qwen2_vl": 9, "qwen2_5_vl": 9}
ORIGINAL_PROCESSOR_CLASS = {"llava_onevision": "LlavaOnevisionProcessor", "qwen2_vl": "Qwen2VLProcessor",
                            "qwen2_5_vl": "Qwen2_5_VLProcessor"}

IMAGE_CONV = calibration_conversations(1, seed=3, size=96)[0]
TEXT_CONV = Conversation(image=None, turns=[("user", "What is sparsity?"), ("assistant", "Zero weights.")],
                         source="text-only test sample")


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {family: write_tiny_vlm(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def models(vlm_dirs):
    return {family: getattr(transformers, ARCHITECTURES[family]).from_pretrained(path).eval()
            for family, path in vlm_dirs.items()}


def save_png(path, colour=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- file formats

def test_read_sharegpt_json(tmp_path):
    save_png(tmp_path / "img" / "a.png")
    absolute = save_png(tmp_path / "elsewhere" / "b.png", colour=(0, 0, 255), size=(20, 50))
    Image.new("L", (8, 8), 7).save(tmp_path / "img" / "grey.png")  # converted to RGB
    path = write_json(tmp_path / "data.json", [
        {"image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                 {"from": "gpt", "value": "Red."}]},
        {"image": str(absolute), "conversations": [{"from": "user", "value": "Describe it.\n<image>"},
                                                   {"from": "assistant", "value": "A blue box."},
                                                   {"from": "human", "value": "Sure?"},
                                                   {"from": "gpt", "value": "Yes."}]},
        {"image": None, "conversations": [{"from": "human", "value": "Text only."}, {"from": "gpt", "value": "Ok."}]},
        {"conversations": [{"from": "human", "value": "No image key."}]},
        {"image": "img/grey.png", "conversations": [{"from": "human", "value": "<image>"}]},
    ])
    convs = read_multimodal_file(path)
    assert [c.source for c in convs] == [f"{path} sample {i}" for i in range(5)]
    assert convs[0].turns == [("user", "What colour?"), ("assistant", "Red.")]
    assert convs[0].image.mode == "RGB" and convs[0].image.size == (40, 30)
    assert convs[0].image.getpixel((0, 0)) == (200, 30, 30)
    assert convs[1].turns == [("user", "Describe it."), ("assistant", "A blue box."), ("user", "Sure?"),
                              ("assistant", "Yes.")]
    assert convs[1].image.size == (20, 50)
    assert convs[2].image is None and convs[2].turns == [("user", "Text only."), ("assistant", "Ok.")]
    assert convs[3].image is None
    assert convs[4].image.mode == "RGB" and convs[4].turns == [("user", "")]


def test_read_jsonl_both_formats(tmp_path):
    save_png(tmp_path / "pics" / "x.png")
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"image": "pics/x.png", "text": "A red rectangle."},
        {"text": "Just text."},
        {"image": "pics/x.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                  {"from": "gpt", "value": "A."}]},
    ])
    path.write_text(path.read_text() + "\n\n")  # blank lines are skipped
    convs = read_multimodal_file(path)
    assert [c.turns for c in convs] == [[("user", "A red rectangle.")], [("user", "Just text.")],
                                        [("user", "Q?"), ("assistant", "A.")]]
    assert [c.image is None for c in convs] == [False, True, False]
    assert convs[2].source == f"{path} sample 2"


def test_limit_reads_only_the_first_samples(tmp_path):
    records = [{"text": "one"}, {"text": "two"}, {"image": "missing.png", "text": "never opened"}]
    for path in (write_json(tmp_path / "a.json", records), write_jsonl(tmp_path / "a.jsonl", records)):
        assert [c.turns for c in read_multimodal_file(path, limit=2)] == [[("user", "one")], [("user", "two")]]
        with pytest.raises(AtvSparseError, match="sample 2.*missing.png"):
            read_multimodal_file(path)


def test_json_lines_in_a_json_file(tmp_path):
    path = write_jsonl(tmp_path / "data.json", [{"text": "one"}, {"text": "two"}])
    assert [c.turns for c in read_multimodal_file(path)] == [[("user", "one")], [("user", "two")]]


def _sharegpt(image, *values):
    roles = ("human", "gpt")
    record = {"conversations": [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]}
    if image is not None:
        record["image"] = image
    return record


# (name, file name, file content or records, substrings every message must contain)
ERROR_CASES = [
    ("empty", "data.json", "  \n", ["data.json", "empty"]),
    ("invalid json", "data.json", '[{"text": "a"},', ["data.json", "not valid JSON"]),
    ("not a list", "data.json", {"text": "a"}, ["data.json", "JSON list"]),
    ("no samples", "data.json", [], ["data.json", "no samples"]),
    ("invalid jsonl line", "data.jsonl", '{"text": "a"}\n{"text": \n', ["data.jsonl", "sample 1", "line 2"]),
    ("not an object", "data.jsonl", [{"text": "a"}, ["x"]], ["data.jsonl", "sample 1", "JSON object"]),
    ("no text or conversations", "data.json", [{"text": "a"}, {"image": "a.png"}],
     ["data.json", "sample 1", '"conversations" or "text"']),
    ("image missing", "data.json", [{"text": "a"}, {"text": "b"}, {"image": "nope/missing.png", "text": "c"}],
     ["data.json", "sample 2", "nope/missing.png", "does not exist"]),
    ("image unreadable", "data.jsonl", [{"image": "broken.png", "text": "c"}],
     ["data.jsonl", "sample 0", "broken.png", "cannot read image"]),
    ("two placeholders", "data.json", [_sharegpt("a.png", "<image>\n<image>\nQ", "A")],
     ["data.json", "sample 0", "image-token count in the text does not match the images"]),
    ("placeholder without image", "data.json", [{"text": "ok"}, _sharegpt(None, "<image>\nQ", "A")],
     ["data.json", "sample 1", "image-token count in the text does not match the images"]),
    ("image without placeholder", "data.jsonl", [_sharegpt("a.png", "Q", "A")],
     ["data.jsonl", "sample 0", "image-token count in the text does not match the images"]),
    ("placeholder in the answer", "data.json", [_sharegpt("a.png", "Q", "<image>\nA")],
     ["data.json", "sample 0", "first user turn"]),
    ("unknown role", "data.json", [{"conversations": [{"from": "system", "value": "x"}]}],
     ["data.json", "sample 0", "'system'"]),
    ("text placeholder without image", "data.jsonl", [{"text": "<image>\nDescribe."}],
     ["data.jsonl", "sample 0", "image-token count"]),
]


@pytest.mark.parametrize("name,filename,content,needles", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_read_errors(tmp_path, name, filename, content, needles):
    save_png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = tmp_path / filename
    if isinstance(content, str):
        path.write_text(content)
    elif filename.endswith(".jsonl"):
        write_jsonl(path, content)
    else:
        write_json(path, content)
    with pytest.raises(AtvSparseError) as info:
        read_multimodal_file(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_missing_file(tmp_path):
    with pytest.raises(AtvSparseError, match="nope.jsonl.*does not exist"):
        read_multimodal_file(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- processed samples, every family

def consumed_image_positions(model, sample):
    """Positions whose layer-0 input is not the token embedding: where the model put image features."""
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = model.get_decoder().layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**sample, use_cache=False).logits
    finally:
        handle.remove()
    assert logits.shape[:2] == sample["input_ids"].shape and torch.isfinite(logits).all()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(sample["input_ids"])
    return (captured["hidden"] != embeds).any(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_run_through_the_model(vlm_dirs, models, family):
    processor = load_processor(vlm_dirs[family])
    model = models[family]
    image_token_id = model.config.image_token_id
    sample = build_sample(processor, IMAGE_CONV, image_token_id)
    assert all(isinstance(v, torch.Tensor) for v in sample.values())
    assert sample["input_ids"].shape[0] == 1 and sample["attention_mask"].shape == sample["input_ids"].shape
    is_image = sample["input_ids"] == image_token_id
    assert int(is_image.sum()) == EXPECTED_IMAGE_TOKENS[family]
    assert torch.equal(consumed_image_positions(model, sample), is_image)
    # The whole conversation is there: the answer's tokens are in the sequence, tokenized as the
    # template places the answer (after LLaVA's "ASSISTANT: ", a space the BPE merges into the word).
    answer = IMAGE_CONV.turns[1][1]
    answers = [processor.tokenizer(text, add_special_tokens=False).input_ids for text in (answer, " " + answer)]
    ids = sample["input_ids"][0].tolist()
    assert any(ids[i:i + len(a)] == a for a in answers for i in range(len(ids)))

    text = build_sample(processor, TEXT_CONV, image_token_id)
    assert "pixel_values" not in text and int((text["input_ids"] == image_token_id).sum()) == 0
    assert not consumed_image_positions(model, text).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_no_chat_template_falls_back_to_the_placeholder(vlm_dirs, models, family):
    processor = load_processor(vlm_dirs[family])
    processor.chat_template = None
    model = models[family]
    sample = build_sample(processor, IMAGE_CONV, model.config.image_token_id)
    is_image = sample["input_ids"] == model.config.image_token_id
    assert int(is_image.sum()) == EXPECTED_IMAGE_TOKENS[family]
    assert torch.equal(consumed_image_positions(model, sample), is_image)


def test_text_sample_with_an_image_token_is_rejected(vlm_dirs, models):
    processor = load_processor(vlm_dirs["llava"])
    conv = Conversation(image=None, turns=[("user", "look: <image>")], source="data.jsonl sample 7")
    with pytest.raises(AtvSparseError, match="data.jsonl sample 7.*image"):
        build_sample(processor, conv, models["llava"].config.image_token_id)


def test_template_without_image_placeholder_is_rejected(vlm_dirs, models):
    processor = load_processor(vlm_dirs["qwen2_vl"])
    processor.chat_template = "{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}"
    conv = Conversation(image=IMAGE_CONV.image, turns=[("user", "What?")], source="data.json sample 4")
    with pytest.raises(AtvSparseError, match="data.json sample 4"):
        build_sample(processor, conv, models["qwen2_vl"].config.image_token_id)


# ---------------------------------------------------------------- processors on disk

@pytest.mark.parametrize("family", FAMILIES)
def test_processor_round_trip(vlm_dirs, tmp_path, family):
    processor = load_processor(vlm_dirs[family])
    assert isinstance(processor, ProcessorMixin)
    processor.save_pretrained(tmp_path)
    again = load_processor(tmp_path)
    assert type(again) is type(processor)
    assert again.chat_template == processor.chat_template
    assert getattr(again, "num_image_tokens", None) == getattr(processor, "num_image_tokens", None)
    token_id = again.tokenizer.convert_tokens_to_ids(again.image_token)
    a, b = (build_sample(p, IMAGE_CONV, token_id) for p in (processor, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", sorted(ORIGINAL_PROCESSOR_CLASS))
def test_original_processor_class_name_loads(vlm_dirs, tmp_path, family):
    ckpt = tmp_path / family
    shutil.copytree(vlm_dirs[family], ckpt)
    for name in ("processor_config.json", "tokenizer_config.json"):
        cfg = json.loads((ckpt / name).read_text())
        cfg["processor_class"] = ORIGINAL_PROCESSOR_CLASS[family]
        (ckpt / name).write_text(json.dumps(cfg))
    processor = load_processor(ckpt)
    # The image-only subclass here; the original class itself where torchvision is installed.
    assert isinstance(processor, getattr(transformers, ORIGINAL_PROCESSOR_CLASS[family]))
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor) is IMAGE_ONLY_PROCESSORS[family][1]
    assert processor.chat_template
    if family == "llava_onevision":
        assert processor.num_image_tokens == 4
    token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    sample = build_sample(processor, IMAGE_CONV, token_id)
    assert int((sample["input_ids"] == token_id).sum()) == EXPECTED_IMAGE_TOKENS[family]


def test_register_is_idempotent():
    register_image_only_processors()
    register_image_only_processors()


def test_load_processor_errors(tmp_path, tiny_llama):
    with pytest.raises(AtvSparseError, match="nope"):
        load_processor(tmp_path / "nope")
    with pytest.raises(AtvSparseError, match=f"{tiny_llama}.*no multimodal processor"):
        load_processor(tiny_llama)  # a text-only model: AutoProcessor silently gives the tokenizer


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_token_mix_counts_the_image_tokens(vlm_dirs, family):
    """CalibrationSet.token_mix (printed by convert, in prune_report.json) against a plain count of
    the image token id in the samples' input_ids."""
    from atv_sparse.calib import load_calibration
    from atv_sparse.models import adapter_for, read_config
    from atv_sparse.convert.preflight import check_processor

    ckpt = vlm_dirs[family]
    adapter = adapter_for(read_config(ckpt), ckpt)
    calibration = load_calibration(ckpt, adapter, nsamples=3, seqlen=2048, seed=5, processor=check_processor(ckpt),
                                   default_conversations=calibration_conversations)
    image_id = transformers.AutoConfig.from_pretrained(ckpt).image_token_id
    ids = torch.cat([s["input_ids"][0] for s in calibration.samples])
    visual = int((ids == image_id).sum())
    mix = calibration.token_mix()
    assert (mix["visual"], mix["text"]) == (visual, ids.numel() - visual)
    assert mix["visual_share"] == pytest.approx(visual / ids.numel())
