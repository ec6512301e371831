"""What a model understands, told to clients: `/v1/models` lists the words of a model trained on a closed caption
grammar (`ModelCard.vocabulary`; the embedded rf-shapes models), and an image response names the prompt's words
outside them in `warnings`, since such a prompt still answers, with a picture that follows nothing in particular."""
from __future__ import annotations

from rfserve.model_zoo.base import ModelCard
from rfserve.server.schemas import VocabularyObject


def vocabulary_object(card: ModelCard) -> VocabularyObject | None:
    v = card.vocabulary
    if v is None:
        return None
    return VocabularyObject(colours=list(v.colours), shapes=list(v.shapes), counts=list(v.counts),
                            backgrounds=list(v.backgrounds), examples=list(v.examples))


def prompt_warnings(card: ModelCard, prompt: str) -> list[str] | None:
    """One warning naming every word of `prompt` the model does not know, with what it does know; None when the
    model takes free text or knows every word."""
    v = card.vocabulary
    unknown = [] if v is None else v.unknown(prompt)
    if v is None or not unknown:
        return None
    words = ", ".join(repr(w) for w in unknown)
    return [f"{card.name} does not know {words}: the picture does not follow "
            f"{'it' if len(unknown) == 1 else 'them'}. It knows colours {', '.join(v.colours)}; shapes "
            f"{', '.join(v.shapes)} (plural with s); counts {', '.join(v.counts)}; backgrounds "
            f"{', '.join(v.backgrounds)}; as in \"{v.examples[0]}\""]
