"""The LM folder: what ``qn lm build`` writes and ``--lm DIR`` reads.

::

    DIR/lm.json       what was built: order, pruning, estimator, labels, text statistics
    DIR/lm.arpa       the n-gram LM in ARPA format (modified Kneser-Ney, KenLM's lmplz)
    DIR/lm.bin        the same LM in KenLM's binary format (loads in milliseconds)
    DIR/unigrams.txt  the decoder's word list, one word a line, most frequent first
    DIR/decoder.json  the best decoding settings `qn lm tune` found (alpha, beta, beam)
    DIR/tuning.csv, DIR/tuning.png   the tuning grid and its heatmap

A folder made by hand (an ARPA or KenLM binary file and a ``unigrams.txt``, e.g. from NeMo's
``train_kenlm.py``) works too; ``lm.json`` and ``decoder.json`` are optional.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from qn_keras.errors import UserInputError
from qn_keras.lm.corpus import words_outside_labels

LM_JSON = "lm.json"
ARPA_FILE = "lm.arpa"
BINARY_FILE = "lm.bin"
UNIGRAMS_FILE = "unigrams.txt"
DECODER_JSON = "decoder.json"
TUNING_CSV = "tuning.csv"
TUNING_PNG = "tuning.png"

LM_SUFFIXES = (".bin", ".binary", ".arpa")
KENLM_BINARY_MAGIC = b"mmap lm http://kheafield.com/code"
ARPA_HEADER = "\\data\\"
# Settings decoder.json may hold, and their types.
DECODER_SETTINGS = {
    "alpha": float,
    "beta": float,
    "beam_width": int,
    "beam_prune_logp": float,
    "token_min_logp": float,
}


class LMFolderError(UserInputError):
    """An LM folder or file that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class LMFolder:
    """A checked LM folder: the LM file to load, its word list, and what is known about it."""

    path: Path
    lm_file: Path
    unigrams: tuple[str, ...]
    metadata: dict
    tuned: dict

    @property
    def labels(self) -> tuple[str, ...] | None:
        """The labels the LM was built for (None for a hand-made folder)."""
        labels = self.metadata.get("labels")
        return tuple(labels) if labels else None

    def check_labels(self, labels: Sequence[str]) -> None:
        """Every word must be spellable with the model's labels, or the decoder could never
        produce it (and pyctcdecode would only warn)."""
        bad = words_outside_labels(self.unigrams, labels)
        if bad:
            examples = ", ".join(f"{w!r} ({c!r})" for w, c in list(bad.items())[:5])
            raise LMFolderError(
                f"{self.path / UNIGRAMS_FILE}: {len(bad)} of {len(self.unigrams)} words have "
                f"characters outside the model's labels, e.g. {examples}; rebuild the LM with "
                "the model's labels (qn lm build --labels FILE)"
            )


def check_lm_file(path: Path) -> str:
    """``"binary"`` or ``"arpa"`` by the file's first bytes; anything else is an error that
    names the file (KenLM itself would report a parse error deep into the file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise LMFolderError(f"{path}: cannot read the LM ({e.strerror})") from None
    if head.startswith(KENLM_BINARY_MAGIC):
        return "binary"
    text = head.decode("utf-8", errors="replace").lstrip()
    if text.startswith(ARPA_HEADER):
        return "arpa"
    shown = text[:40].splitlines()[0] if text.strip() else "(empty)"
    raise LMFolderError(
        f"{path}: not an ARPA or KenLM binary language model (it starts with {shown!r}; an "
        f"ARPA file starts with {ARPA_HEADER!r}); build one with qn lm build"
    )


def _lm_file(folder: Path) -> Path:
    for name in (BINARY_FILE, ARPA_FILE):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in LM_SUFFIXES and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise LMFolderError(
            f"{folder}: no language model in the folder (expected {BINARY_FILE} or "
            f"{ARPA_FILE}); build one with qn lm build --out {folder}"
        )
    raise LMFolderError(
        f"{folder}: several LM files ({', '.join(p.name for p in found)}); keep one, or name "
        f"it {BINARY_FILE}"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LMFolderError(f"{path}: expected a JSON object")
    return data


def read_unigrams(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise LMFolderError(
            f"{path.parent}: no {UNIGRAMS_FILE} (the decoder's word list, one word a line); "
            "qn lm build writes it, or make one from the LM's training text"
        )
    try:
        words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise LMFolderError(f"{path}: not UTF-8 text") from None
    words = [w for w in words if w]
    bad = [w for w in words if " " in w or "\t" in w]
    if bad:
        raise LMFolderError(f"{path}: one word a line expected; line {bad[0]!r} has several")
    if not words:
        raise LMFolderError(f"{path}: the word list is empty")
    return tuple(words)


def check_decoder_settings(settings: dict, source) -> dict:
    """Known keys with numbers of the right type; the error names ``source``."""
    out = {}
    for key, value in settings.items():
        kind = DECODER_SETTINGS.get(key)
        if kind is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LMFolderError(f"{source}: {key} must be a number (got {value!r})")
        if kind is int and (value != int(value) or value < 1):
            raise LMFolderError(f"{source}: {key} must be a positive integer (got {value!r})")
        out[key] = kind(value)
    return out


def load_lm_folder(path) -> LMFolder:
    """Checks an LM folder and returns what the decoder needs; errors name the file at fault."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LM folder not found: {path}")
    if path.is_file():
        raise LMFolderError(
            f"{path} is a file; --lm takes an LM folder (qn lm build --out DIR), with the LM "
            f"and its {UNIGRAMS_FILE} inside"
        )
    lm_file = _lm_file(path)
    check_lm_file(lm_file)
    unigrams = read_unigrams(path / UNIGRAMS_FILE)
    metadata = _read_json(path / LM_JSON) if (path / LM_JSON).is_file() else {}
    tuned = {}
    if (path / DECODER_JSON).is_file():
        tuned = check_decoder_settings(_read_json(path / DECODER_JSON), path / DECODER_JSON)
    return LMFolder(path=path, lm_file=lm_file, unigrams=unigrams, metadata=metadata, tuned=tuned)
