"""A byte-level tokenizer built in code, so built-in models need no downloaded vocabulary."""

from __future__ import annotations

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def build_byte_tokenizer(extra_special_tokens: dict[str, str] | None = None):
    """A byte-level BPE tokenizer without merges: every UTF-8 string encodes, one token per byte.

    Token ids: the specials in `SPECIAL_TOKENS` order first (so `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3,
    `<image>`=4), then the 256 byte symbols, then `extra_special_tokens` (attribute name -> token, e.g. the
    vision start/end markers Qwen-VL prompts use) in the order given, so the base ids never move.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    extra = dict(extra_special_tokens or {})
    if extra:
        from tokenizers import AddedToken

        core.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in extra.values()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", **extra},
        padding_side="left",
    )
