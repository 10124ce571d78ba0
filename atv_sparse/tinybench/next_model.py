"""A tiny LLaVA-NeXT (``LlavaNextForConditionalGeneration``) with anyres tiling: the second tiny VLM.

The second tiny VLM is built like the paper's models rather than trained jointly from scratch:
a language model pretrained on text alone, then only the projector trained on captions with the
language model frozen (LLaVA stage 1), then instruction tuning of projector and language model
(stage 2). Visual tokens then enter the language model as foreign inputs, which is what
token-selective calibration is about. :data:`STAGES` says what each stage trains and
:func:`set_stage` applies it; the training script uses nothing else to freeze parameters.

Shape: the bundled tiny VLM's CLIP tower (56 px crops, 7 px patches, 64 tokens per crop; its
trained weights are copied in and stay frozen) and the same Llama size and tokenizer. Scenes are
drawn at 112 px (:data:`IMAGE_SIZE`): the processor picks the 112 x 112 grid pinpoint and feeds the
base view (resized to 56 px) plus 2 x 2 tiles of 56 px, 5 crops in all; the tiles' 16 x 16 patch
grid gets one ``image_newline`` token per row: 64 + 256 + 16 = 336 image tokens per image
(:data:`NUM_IMAGE_TOKENS`), against 15-60 text tokens, as with LLaVA-NeXT-8B's 2,880 image tokens
against a ShareGPT4V caption. Other aspect ratios tile to the other pinpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from . import model as tiny_vlm

CROP_SIZE = tiny_vlm.IMAGE_SIZE
PATCH_SIZE = tiny_vlm.PATCH_SIZE
IMAGE_SIZE = 2 * CROP_SIZE
GRID_PINPOINTS = [[112, 112], [56, 112], [112, 56], [56, 168], [168, 56]]
TOKENS_PER_CROP = (CROP_SIZE // PATCH_SIZE) ** 2
NUM_IMAGE_TOKENS = TOKENS_PER_CROP + 4 * TOKENS_PER_CROP + 2 * (CROP_SIZE // PATCH_SIZE)

# Parameter groups, as attribute paths on LlavaNextForConditionalGeneration.
GROUPS = {"vision_tower": "model.vision_tower", "projector": "model.multi_modal_projector",
          "image_newline": "model.image_newline", "language_model": "model.language_model",
          "lm_head": "lm_head"}
STAGES = {
    "text": ("language_model", "lm_head"),                                   # pretraining, text alone
    "align": ("projector", "image_newline"),                                 # LLaVA stage 1
    "instruct": ("projector", "image_newline", "language_model", "lm_head"),  # LLaVA stage 2
}


def build_processor(tokenizer=None):
    """LlavaNextProcessor: PIL anyres image processor (56 px crops, :data:`GRID_PINPOINTS`) and the
    tiny VLM's chat template."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = tokenizer if tokenizer is not None else tiny_vlm.build_tokenizer()
    image = LlavaNextImageProcessorPil(size={"shortest_edge": CROP_SIZE},
                                       crop_size={"height": CROP_SIZE, "width": CROP_SIZE},
                                       image_grid_pinpoints=GRID_PINPOINTS)
    return LlavaNextProcessor(image, tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=tiny_vlm.CHAT_TEMPLATE)


def build_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vocab = -(-len(tokenizer) // 64) * 64
    text = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **tiny_vlm.TEXT_CONFIG)
    return LlavaNextConfig(vision_config=CLIPVisionConfig(**tiny_vlm.VISION_CONFIG), text_config=text,
                           image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                           image_grid_pinpoints=GRID_PINPOINTS, vision_feature_select_strategy="default",
                           vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False)


def build_model(tokenizer, seed: int = 0, vision_from=None):
    """An untrained LlavaNextForConditionalGeneration (fp32) initialised from ``seed``.

    vision_from: a LlavaForConditionalGeneration whose vision tower (same CLIP config) is copied
    in, normally the bundled tiny VLM; None keeps the random tower.
    """
    from transformers import LlavaNextForConditionalGeneration

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaNextForConditionalGeneration(build_config(tokenizer)).eval()
    finally:
        torch.random.set_rng_state(state)
    if vision_from is not None:
        model.model.vision_tower.load_state_dict(vision_from.model.vision_tower.state_dict())
    return model


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """group -> (name, parameter) of every parameter; each parameter in exactly one group."""
    groups = {}
    for group, path in GROUPS.items():
        owner = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        obj = getattr(owner, path.rsplit(".", 1)[-1])
        groups[group] = ([(path, obj)] if isinstance(obj, nn.Parameter)
                         else [(f"{path}.{n}", p) for n, p in obj.named_parameters()])
    seen = {id(p) for params in groups.values() for _, p in params}
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    assert not missing, f"parameters in no group: {missing}"
    return groups


def set_stage(model: nn.Module, stage: str) -> list[str]:
    """Let exactly the groups of ``STAGES[stage]`` train; returns the trainable parameter names.

    Frozen groups also go to eval mode, the trained ones to train mode.
    """
    assert stage in STAGES, f"stage {stage!r}: expected one of {', '.join(STAGES)}"
    trained = []
    for group, params in parameter_groups(model).items():
        on = group in STAGES[stage]
        for name, p in params:
            p.requires_grad_(on)
            if on:
                trained.append(name)
    model.eval()
    for group in STAGES[stage]:
        if group != "image_newline":  # a bare Parameter, no mode
            model.get_submodule(GROUPS[group]).train()
    return trained
