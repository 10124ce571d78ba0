"""Tiny offline checkpoints of every supported family (random weights, in-process tokenizer, real
processor), for the tests and the benchmarks.

``write_tiny_llm(path, family)`` saves a LLaMA or Qwen2 causal LM with its tokenizer;
``write_tiny_vlm(path, family)`` saves a model, its processor, tokenizer and chat template to
``path`` for each of the five LVLM families atv_sparse supports. The configs are the ones
measured in /work/shared/notes/tiny-models.md (section 2): text model H=64, I=128, 2 layers,
4 heads, 2 KV heads (head_dim 16), vocab 512; a 2-layer vision tower on 28 or 56 px inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")

ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}

TEXT_DIMS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)

# Special tokens (ids 0..k-1 in this order) and which of them play bos / eos / unk / pad.
SPECIAL_TOKENS = {
    "llava": ["<unk>", "<s>", "</s>", "<image>"],
    "llava_next": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<image>"],
    "llava_onevision": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
    "qwen2_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"],
}
SPECIAL_TOKENS["qwen2_5_vl"] = SPECIAL_TOKENS["qwen2_vl"]

TOKEN_ROLES = {
    "llava": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                  extra_special_tokens={"image_token": "<image>"}),
    "llava_next": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
                       extra_special_tokens={"image_token": "<image>"}),
    "llava_onevision": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            extra_special_tokens={"image_token": "<image>", "video_token": "<video>"}),
    "qwen2_vl": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                           "vision_start_token": "<|vision_start|>",
                                           "vision_end_token": "<|vision_end|>"}),
}
TOKEN_ROLES["qwen2_5_vl"] = TOKEN_ROLES["qwen2_vl"]

# Content of one message: a string, or a list of {"type": "image"} / {"type": "text", "text": ...}.
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}"
            "{% if item['type'] == 'image' %}IMAGE"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
            "{% endfor %}{% endif %}")

CHAT_TEMPLATES = {
    # LLaVA-1.5 (Vicuna): "USER: <image>\nQ ASSISTANT: A</s>"
    "llava": ("{{ bos_token }}{% for message in messages %}"
              "{% if message['role'] == 'user' %}USER: " + _CONTENT.replace("IMAGE", "<image>\n") + " "
              "{% else %}ASSISTANT: " + _CONTENT.replace("IMAGE", "") + "{{ eos_token }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    # Llama-3 headers.
    "llava_next": ("{{ bos_token }}{% for message in messages %}"
                   "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
                   + _CONTENT.replace("IMAGE", "<image>\n") + "<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    # ChatML (Qwen2 / OneVision).
    "llava_onevision": ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                        + _CONTENT.replace("IMAGE", "<image>\n") + "<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "qwen2_vl": ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 + _CONTENT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
                 + "<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
CHAT_TEMPLATES["qwen2_5_vl"] = CHAT_TEMPLATES["qwen2_vl"]

# LLaVA-NeXT / OneVision anyres grids (processor and model must agree).
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
ONEVISION_PINPOINTS = [[28 * a, 28 * b] for a in range(1, 4) for b in range(1, 4)]


def tiny_tokenizer(family: str):
    """The family's byte-level BPE, trained in-process on the embedded calibration text."""
    from transformers import PreTrainedTokenizerFast

    from ..calib import default_calibration_text
    from .tokenizer import train_tiny_tokenizer

    trained = train_tiny_tokenizer(default_calibration_text(), SPECIAL_TOKENS[family])
    # Re-wrap the same tokenizers.Tokenizer to give the family's roles and its image token
    # (the dict form of extra_special_tokens creates tokenizer.image_token / image_token_id).
    return PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, **TOKEN_ROLES[family])


def _tiny_config(family: str, tok, text_dims: dict):
    import transformers as tf

    special = TOKEN_ROLES[family]["extra_special_tokens"]
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in special.items()}
    text_ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    if family == "llava":
        return tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision, image_size=56),
                              text_config=tf.LlamaConfig(**text_dims, **text_ids),
                              image_token_index=ids["image_token"], vision_feature_select_strategy="default",
                              vision_feature_layer=-2)
    if family == "llava_next":
        rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
        return tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**vision, image_size=28),
                                  text_config=tf.LlamaConfig(**text_dims, **text_ids, rope_parameters=rope),
                                  image_token_index=ids["image_token"], image_grid_pinpoints=NEXT_PINPOINTS,
                                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**vision, image_size=28),
                                       text_config=tf.Qwen2Config(**text_dims, **text_ids, tie_word_embeddings=True),
                                       image_token_index=ids["image_token"], video_token_index=ids["video_token"],
                                       image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9",
                                       vision_feature_select_strategy="full", vision_feature_layer=-1)
    text = dict(text_dims, **text_ids, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [2, 3, 3]})
    token_ids = dict(image_token_id=ids["image_token"], video_token_id=ids["video_token"],
                     vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"])
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=text_dims["hidden_size"], num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return tf.Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=text_dims["hidden_size"], intermediate_size=64,
                      num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _tiny_processor(family: str, tok):
    import transformers as tf

    from ..models.processors import (LlavaOnevisionImageOnlyProcessor, Qwen2_5_VLImageOnlyProcessor,
                                              Qwen2VLImageOnlyProcessor)

    template = CHAT_TEMPLATES[family]
    llava_kw = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                    chat_template=template)
    if family == "llava":
        image = tf.LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        return tf.LlavaProcessor(image, tok, **llava_kw)
    if family == "llava_next":
        image = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                              image_grid_pinpoints=NEXT_PINPOINTS)
        return tf.LlavaNextProcessor(image, tok, **llava_kw)
    if family == "llava_onevision":
        image = tf.LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                                   image_grid_pinpoints=ONEVISION_PINPOINTS)
        return LlavaOnevisionImageOnlyProcessor(image, tok, num_image_tokens=4, vision_feature_select_strategy="full",
                                                chat_template=template, vision_aspect_ratio="anyres_max_9")
    image = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14,
                                        merge_size=2, temporal_patch_size=2)
    cls = Qwen2VLImageOnlyProcessor if family == "qwen2_vl" else Qwen2_5_VLImageOnlyProcessor
    return cls(image, tok, chat_template=template)


def write_tiny_vlm(path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                   text_dims: dict | None = None) -> Path:
    """Save a tiny random ``ARCHITECTURES[family]`` model with its processor and tokenizer to ``path``;
    ``text_dims`` replaces :data:`TEXT_DIMS` (the language model's sizes), e.g. a real model's shapes."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = Path(path)
    tok = tiny_tokenizer(family)
    config = _tiny_config(family, tok, TEXT_DIMS if text_dims is None else text_dims)
    processor = _tiny_processor(family, tok)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = getattr(tf, ARCHITECTURES[family])(config).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(path)
    processor.save_pretrained(path)  # also writes the tokenizer files and chat_template.jinja
    return path


LLM_FAMILIES = ("llama", "qwen2")
LLM_DIMS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def write_tiny_llm(path, family: str, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a tiny random LlamaForCausalLM or Qwen2ForCausalLM with its tokenizer to ``path``;
    ``overrides`` replace entries of :data:`LLM_DIMS`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from ..calib import default_calibration_text
    from .tokenizer import train_tiny_tokenizer

    if family not in LLM_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {LLM_FAMILIES}")
    dims = {**LLM_DIMS, **overrides}
    if family == "llama":
        tok = train_tiny_tokenizer(default_calibration_text(), ["<s>", "</s>"])
        config = LlamaConfig(**dims, head_dim=dims["hidden_size"] // dims["num_attention_heads"])
        cls = LlamaForCausalLM
    else:
        tok = train_tiny_tokenizer(default_calibration_text(), ["<|endoftext|>", "<|im_end|>"])
        config = Qwen2Config(**dims)
        cls = Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
