"""The embedded default model: a tiny random-weight Llama with its own tokenizer, no download.

``python -m atv_sparse.convert`` with no checkpoint builds it in a temp directory with a fixed
seed and then loads it through the same code as any user checkpoint. The weights are random, so
the run shows the pipeline and its report, not the accuracy of a method.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)


def train_tiny_tokenizer(text: str, special_tokens: list[str], vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in-process on ``text`` (special tokens get ids 0..k-1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special_tokens[0], eos_token=special_tokens[1],
                                   unk_token=special_tokens[0], pad_token=special_tokens[1])


def build_tiny_llama(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the embedded default model (config, safetensors, tokenizer) to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .calib import default_calibration_text

    out_dir = Path(out_dir)
    tokenizer = train_tiny_tokenizer(default_calibration_text(), ["<s>", "</s>"])
    config = LlamaConfig(**TINY_LLAMA, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
