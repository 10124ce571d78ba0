"""The byte-level BPE of every tiny model built offline: the bundled tiny VLM's and the test checkpoints'."""

from __future__ import annotations


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
