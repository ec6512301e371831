"""Word-level tokenizer over the caption grammar, saved as a PreTrainedTokenizerFast.

The serving code loads it with `AutoTokenizer.from_pretrained(path, subfolder="tokenizer")`
and pads to `model_max_length`, exactly like the CLIP tokenizer of the InstaFlow checkpoints.
"""
from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from .data import vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
MAX_LENGTH = 16  # longest caption is 7 words + BOS/EOS


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *vocabulary()])}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=MAX_LENGTH, padding_side="right")
