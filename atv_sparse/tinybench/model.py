"""The bundled tiny vision-language model: a LLaVA-1.5-style ``LlavaForConditionalGeneration``.

Built here from a config (untrained), trained by ``benchmarks/tiny_model/train.py`` on the
synthetic tasks of :mod:`atv_sparse.tinybench.tasks`, shipped trained in
``atv_sparse/assets/tiny_vlm/`` (see the model card there; :func:`bundled_model_dir`).

Shape of the model, chosen so that its token mix is like a real LVLM's:
- vision: CLIP, 56 x 56 px images, patch 7 -> 8 x 8 = 64 patch tokens (+ CLS, dropped by the
  "default" feature strategy), hidden 128, 3 layers; features from the last layer;
- projector: LLaVA's two-layer MLP, 128 -> 128 -> 128;
- language model: Llama, hidden 128, MLP 256, 6 layers, 4 heads of 32 (no GQA), vocab padded
  to a multiple of 64. Every decoder linear is (128|256) x (128|256): multiples of 64 for GPU
  2:4 / 4:8 kernels;
- 64 image tokens against 15-25 text tokens in a single-turn question.

Prompt format (Vicuna, as LLaVA-1.5): ``<s>USER: <image>\\n{question} ASSISTANT: {answer}</s>``;
``LlavaProcessor`` expands ``<image>`` to 64 image tokens. The training script builds the same
ids (and the answer labels) without Jinja; a test checks them against the processor.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

IMAGE_SIZE = 56
PATCH_SIZE = 7
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>"]
TOKENIZER_VOCAB = 704
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-5)
VISION_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                     image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{% if message['role'] == 'user' %}USER: "
                 "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
                 "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
                 "{% else %}ASSISTANT: {% for item in message['content'] %}{% if item['type'] == 'text' %}"
                 "{{ item['text'] }}{% endif %}{% endfor %}{{ eos_token }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def bundled_model_dir() -> Path:
    """The directory of the trained tiny VLM shipped with the package."""
    return Path(str(resources.files("atv_sparse").joinpath("assets", "tiny_vlm")))


def build_tokenizer():
    """The model's byte-level BPE, trained in-process on the synthetic tasks' text (deterministic)."""
    from transformers import PreTrainedTokenizerFast

    from .tasks import tokenizer_corpus
    from .tokenizer import train_tiny_tokenizer

    trained = train_tiny_tokenizer(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=TOKENIZER_VOCAB)
    return PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer=None):
    """LlavaProcessor: the PIL CLIP image processor at 56 px and the chat template above."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image, tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = -(-len(tokenizer) // 64) * 64
    text = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **TEXT_CONFIG)
    return LlavaConfig(vision_config=CLIPVisionConfig(**VISION_CONFIG), text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       projector_hidden_act="gelu", image_seq_length=NUM_IMAGE_TOKENS,
                       tie_word_embeddings=False)


def build_model(tokenizer, seed: int = 0):
    """An untrained LlavaForConditionalGeneration (fp32) initialised from ``seed``."""
    from transformers import LlavaForConditionalGeneration

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LlavaForConditionalGeneration(build_config(tokenizer)).eval()
    finally:
        torch.random.set_rng_state(state)


def write_untrained(path: str | Path, seed: int = 0) -> Path:
    """Save an untrained model with its processor (tokenizer, chat template) to ``path``."""
    path = Path(path)
    processor = build_processor()
    build_model(processor.tokenizer, seed).save_pretrained(path)
    processor.save_pretrained(path)
    return path
