"""What rf-shapes understands, as the server tells clients (`model_zoo.base.Vocabulary`): the words of the
training captions' grammar (data.py), grouped as a caption uses them."""
from __future__ import annotations

from rfserve.model_zoo.base import Vocabulary

from .data import COLOURS, SHAPES, WORD_COUNTS, Scene, vocabulary

# Words no caption holds that ask for nothing to be drawn: articles, prepositions, "and". The model reads each as an
# unknown token like any other, but a prompt that uses them asks for nothing the model lacks, so they draw no warning.
FILLERS = frozenset({"the", "an", "of", "with", "and", "in", "at", "over", "against"})

VOCABULARY = Vocabulary(
    colours=COLOURS, shapes=SHAPES, counts=tuple(WORD_COUNTS),
    backgrounds=COLOURS,                      # any colour but the shapes' own (data.all_scenes)
    examples=tuple(s.caption() for s in (Scene("red", "circle", 2, "blue"), Scene("green", "triangle", 1, "white"))),
    known=frozenset(vocabulary()) | FILLERS)
