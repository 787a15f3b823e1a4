"""LM training text, normalized with the tokenizer's rules so that the LM's words are spelled
exactly as the model spells transcripts.

Input files are plain text (one sentence a line; ``.gz`` read transparently) or NeMo manifests
(``.json``/``.jsonl``: each line's ``text``). Characters outside the labels are dropped and
counted, as ``qn features --oov drop`` does for transcripts.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from qn_keras.errors import UserInputError
from qn_keras.tokenizer import CharTokenizer

MANIFEST_SUFFIXES = (".json", ".jsonl")


class CorpusError(UserInputError):
    """LM text that cannot be read or holds no words."""


@dataclasses.dataclass
class CorpusStats:
    """What normalization did to the text: lines and words kept, characters dropped."""

    files: list = dataclasses.field(default_factory=list)
    lines: int = 0
    empty_lines: int = 0
    words: int = 0
    dropped_chars: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    word_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_json(self) -> dict:
        return {
            "files": [str(f) for f in self.files],
            "lines": self.lines,
            "empty_lines": self.empty_lines,
            "words": self.words,
            "word_types": len(self.word_counts),
            "dropped_chars": sum(self.dropped_chars.values()),
            "dropped_char_counts": dict(self.dropped_chars.most_common(50)),
        }


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _raw_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of one file; a manifest line's ``text`` field."""
    manifest = path.name.removesuffix(".gz").endswith(MANIFEST_SUFFIXES)
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not manifest:
                    yield number, line
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(
                        f"{path}:{number}: not a JSON manifest line ({e.msg}); give plain text "
                        "files a .txt name"
                    ) from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise CorpusError(f"{path}:{number}: manifest line without a 'text' string")
                yield number, text
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}: not UTF-8 text (byte {e.start} of a line: {e.reason}); LM text must be "
            "UTF-8, one sentence a line"
        ) from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise CorpusError(f"{path}: damaged gzip file ({e})") from None
    except IsADirectoryError:
        raise CorpusError(f"{path} is a folder; give text files") from None


def normalized_lines(
    paths: Sequence, tokenizer: CharTokenizer, stats: CorpusStats | None = None
) -> Iterator[str]:
    """Normalized, non-empty lines of every file in turn; ``stats`` is filled as they go."""
    stats = stats if stats is not None else CorpusStats()
    for raw in paths:
        path = Path(raw)
        if not path.is_file() and not path.is_dir():
            raise FileNotFoundError(f"LM text not found: {path}")
        stats.files.append(path)
        for _, line in _raw_lines(path):
            normalized = tokenizer.normalize(line)
            stats.dropped_chars.update(normalized.dropped)
            stats.lines += 1
            if not normalized.text.strip():
                stats.empty_lines += 1
                continue
            words = normalized.text.split()
            stats.words += len(words)
            stats.word_counts.update(words)
            yield " ".join(words)


def write_corpus(paths: Sequence, tokenizer: CharTokenizer, out) -> CorpusStats:
    """Writes the normalized text to ``out`` (one sentence a line) for the estimator; raises
    :class:`CorpusError` when no words are left."""
    stats = CorpusStats()
    with open(out, "w", encoding="utf-8") as f:
        for line in normalized_lines(paths, tokenizer, stats):
            f.write(line + "\n")
    if stats.words == 0:
        names = ", ".join(str(p) for p in paths)
        detail = f" ({stats.lines} lines, all empty after normalization)" if stats.lines else ""
        raise CorpusError(f"No words in the LM text {names}{detail}.")
    return stats


def unigram_list(word_counts: collections.Counter) -> list[str]:
    """The decoder's word list: most frequent first, ties alphabetical (reproducible)."""
    return [w for w, _ in sorted(word_counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def words_outside_labels(words: Iterable[str], labels: Sequence[str]) -> dict[str, str]:
    """``{word: its characters outside labels}`` for words the model cannot spell."""
    allowed = set(labels) - {" "}
    bad = {}
    for word in words:
        outside = sorted(set(word) - allowed)
        if outside:
            bad[word] = "".join(outside)
    return bad
