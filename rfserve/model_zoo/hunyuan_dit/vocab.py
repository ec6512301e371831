"""Offline tokenizers for random-weight checkpoints: a WordPiece `vocab.txt` for the BERT
tokenizer (as the official `tokenizer/` folder ships) and a unigram `T5Tokenizer` trained with
sentencepiece on a few sentences (the official `tokenizer_2/` is an mT5 sentencepiece model).
No hub access is needed, and the same classes load them as load the real ones."""
from __future__ import annotations

import io
import string
from pathlib import Path

import sentencepiece as spm
from transformers import BertTokenizer, T5Tokenizer

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_WORDS = ["red", "blue", "green", "circle", "square", "cat", "dog", "photo", "of", "a", "the", "on"]
CORPUS = (
    "a red circle on a blue square",
    "two green triangles in a photo",
    "a photo of a dog and a cat",
    "painting of mountains at sunset, high quality",
    "一只猫坐在桌子上",
    "山水画，夕阳",
)


def write_bert_vocab(folder: Path, max_length: int = 77) -> BertTokenizer:
    """Specials, the letters and digits with their `##` continuations, and a few whole words,
    so any ASCII prompt tokenizes without [UNK] runs."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ",.")
    tokens = BERT_SPECIALS + chars + [f"##{c}" for c in chars] + BERT_WORDS + list("猫山水画")
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return BertTokenizer(vocab=str(folder / "vocab.txt"), model_max_length=max_length)


def train_t5_tokenizer(vocab_size: int = 96, max_length: int = 256) -> T5Tokenizer:
    """A unigram model over CORPUS with T5's special ids (pad 0, eos 1, unk 2), wrapped as a
    `T5Tokenizer` without the 100 sentinel tokens, as mT5's tokenizer_config has."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
