"""A byte-level tokenizer built in code, so built-in models need no downloaded vocabulary."""

from __future__ import annotations

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def build_byte_tokenizer():
    """A byte-level BPE tokenizer without merges: every UTF-8 string encodes, one token per byte.

    Token ids: the specials in `SPECIAL_TOKENS` order first (so `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3,
    `<image>`=4), then the 256 byte symbols.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
