"""Character tokenizer with NeMo's label convention (blank = last index) and text normalization."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from pathlib import Path

# NeMo's English labels: space, a-z, apostrophe. The CTC blank is index len(labels) (28).
ENGLISH_LABELS = (" ", *"abcdefghijklmnopqrstuvwxyz", "'")


@dataclasses.dataclass(frozen=True)
class Normalized:
    """A normalized transcript and the characters normalization removed (with counts)."""

    text: str
    dropped: dict


class CharTokenizer:
    """Maps transcripts to label ids and back; the CTC blank is the last id.

    Args:
        labels: the label characters, in output order (NeMo's English labels by default).

    Example:
        >>> tok = CharTokenizer()
        >>> tok.encode("hi there")
        [8, 9, 0, 20, 8, 5, 18, 5]
        >>> tok.decode([8, 9]), tok.blank_id, tok.vocabulary_size
        ('hi', 28, 29)
    """

    def __init__(self, labels=ENGLISH_LABELS):
        labels = tuple(labels)
        if not labels:
            raise ValueError("A tokenizer needs at least one label.")
        bad = [label for label in labels if not isinstance(label, str) or len(label) != 1]
        if bad:
            raise ValueError(f"Labels must be single characters. Received: {bad[:5]}")
        if len(set(labels)) != len(labels):
            raise ValueError("Labels must be unique.")
        self.labels = labels
        self._ids = {c: i for i, c in enumerate(labels)}
        self._lowercase = all(not c.isupper() for c in labels)

    @property
    def blank_id(self) -> int:
        return len(self.labels)

    @property
    def vocabulary_size(self) -> int:
        """Output classes of the model: labels plus the blank."""
        return len(self.labels) + 1

    def normalize(self, text: str) -> Normalized:
        """Lower-cases (for lower-case label sets), folds accents the labels lack, maps dashes
        and whitespace to spaces, collapses spaces, and drops characters outside the labels."""
        text = unicodedata.normalize("NFC", text)
        if self._lowercase:
            text = text.lower()
        text = text.replace("\u2019", "'").replace("`", "'")
        out, dropped = [], {}
        for ch in text:
            if ch in self._ids:
                out.append(ch)
                continue
            if ch.isspace() or ch in "-_/":
                if " " in self._ids:
                    out.append(" ")
                continue
            folded = unicodedata.normalize("NFKD", ch)
            folded = "".join(c for c in folded if not unicodedata.combining(c))
            if folded and all(c in self._ids for c in folded):
                out.extend(folded)
                continue
            dropped[ch] = dropped.get(ch, 0) + 1
        normalized = " ".join("".join(out).split()) if " " in self._ids else "".join(out)
        return Normalized(normalized, dropped)

    def encode(self, text: str) -> list[int]:
        """Ids of an already normalized text; KeyError-free: raises ValueError naming the
        characters outside the labels."""
        missing = sorted({c for c in text if c not in self._ids})
        if missing:
            raise ValueError(f"Characters outside the vocabulary: {missing!r} in {text!r}")
        return [self._ids[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.labels[i] for i in ids if 0 <= i < len(self.labels))

    def to_dict(self) -> dict:
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, config: dict) -> CharTokenizer:
        return cls(config["labels"])

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1))

    @classmethod
    def from_file(cls, path) -> CharTokenizer:
        """Labels from a JSON file ``{"labels": [...]}`` or a text file, one label a line (a
        line holding only a space, or the word <space>, is the space label)."""
        text = Path(path).read_text(encoding="utf-8")
        if Path(path).suffix == ".json":
            return cls.from_dict(json.loads(text))
        labels = []
        for line in text.split("\n"):
            if line == "":
                continue
            labels.append(" " if line in (" ", "<space>") else line)
        return cls(labels)
