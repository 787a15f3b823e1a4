"""Transcript to token ids for datasets, with the out-of-vocabulary policy shared by the Beam
pipeline and the on-the-fly manifest reader."""

from __future__ import annotations

import unicodedata

from qn_keras.choices import OOV_POLICIES
from qn_keras.errors import UserInputError

OOV_TRANSCRIPT = "oov_transcript"


class TranscriptError(UserInputError):
    """A transcript that cannot be used, with a machine-readable ``reason``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def out_of_vocabulary(dropped: dict) -> dict:
    """The characters normalization dropped that carry words: punctuation is not speech and is
    always dropped, but a digit, a symbol such as ``%`` or an unknown letter is spoken, so
    losing it makes the transcript wrong."""
    return {ch: n for ch, n in dropped.items() if not unicodedata.category(ch).startswith("P")}


def tokenize_transcript(tokenizer, text: str, oov: str = "drop") -> tuple[str, list[int], dict]:
    """Normalizes ``text`` and encodes it.

    Returns ``(normalized_text, token_ids, oov_characters)``. With ``oov="reject"`` a
    transcript with out-of-vocabulary characters raises :class:`TranscriptError`
    (reason ``"oov_transcript"``); with ``"drop"`` those characters are removed.
    """
    if oov not in OOV_POLICIES:
        raise ValueError(f"oov must be one of {OOV_POLICIES}. Received: oov={oov!r}")
    normalized = tokenizer.normalize(text)
    unknown = out_of_vocabulary(normalized.dropped)
    if unknown and oov == "reject":
        raise TranscriptError(
            OOV_TRANSCRIPT,
            f"Transcript has characters outside the vocabulary {sorted(unknown)!r}: {text!r}",
        )
    return normalized.text, tokenizer.encode(normalized.text), unknown
