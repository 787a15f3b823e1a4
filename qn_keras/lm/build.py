"""``qn lm build``: a modified Kneser-Ney n-gram LM from text, with KenLM's own estimator.

KenLM's ``lmplz`` (Heafield et al. 2013) estimates with disk-backed streaming sorts in bounded
memory, which is how NeMo's ``train_kenlm.py`` builds its LMs too; ``build_binary`` turns the
ARPA file into KenLM's binary format, which the decoder loads in milliseconds. Both are built
from the pinned KenLM release's source by ``tools/build_kenlm.sh`` (``make setup`` runs it),
and are looked up in ``$QN_KENLM_BIN``, beside the running Python, then on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qn_keras import files
from qn_keras.errors import UserInputError
from qn_keras.lm import corpus
from qn_keras.lm.folder import ARPA_FILE, BINARY_FILE, LM_JSON, UNIGRAMS_FILE
from qn_keras.tokenizer import CharTokenizer

MAX_ORDER = 6  # tools/build_kenlm.sh builds KenLM with KENLM_MAX_ORDER=6
BINARY_TYPES = ("trie", "probing")


class KenLMNotFound(UserInputError):
    """lmplz or build_binary is not installed."""


def find_kenlm_tool(name: str) -> str:
    """Path of a KenLM program; the error says how to get it."""
    candidates = []
    if os.environ.get("QN_KENLM_BIN"):
        candidates.append(Path(os.environ["QN_KENLM_BIN"]) / name)
    candidates.append(Path(sys.executable).parent / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise KenLMNotFound(
        f"KenLM's {name} was not found (looked in $QN_KENLM_BIN, {Path(sys.executable).parent} "
        "and PATH); build it with tools/build_kenlm.sh PREFIX (make setup does), or set "
        "QN_KENLM_BIN to the folder holding lmplz and build_binary"
    )


def check_prune(prune: Sequence[int] | None, order: int) -> list[int] | None:
    """lmplz's ``--prune`` thresholds: one count per order from the bigrams up (unigrams are
    never pruned: the decoder needs every word), non-decreasing."""
    if not prune:
        return None
    prune = [int(p) for p in prune]
    if len(prune) > order - 1:
        raise UserInputError(
            f"--prune takes at most {order - 1} thresholds for an order-{order} LM (bigrams "
            f"and up; unigrams are kept), got {len(prune)}"
        )
    if any(p < 0 for p in prune) or any(b < a for a, b in zip(prune, prune[1:], strict=False)):
        raise UserInputError(f"--prune thresholds must be >= 0 and non-decreasing, got {prune}")
    return [0, *prune]


def _run(command: list[str], what: str, log: Path) -> None:
    with open(log, "wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed (exit {result.returncode}): " + " | ".join(tail))


def _ngram_counts(arpa: Path) -> dict[int, int]:
    counts = {}
    with open(arpa, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("ngram "):
                order, _, count = line[6:].partition("=")
                counts[int(order)] = int(count)
            elif line.startswith("\\1-grams:"):
                break
    return counts


def build_lm(
    texts: Sequence,
    out,
    *,
    order: int = 4,
    prune: Sequence[int] | None = None,
    tokenizer: CharTokenizer | None = None,
    binary: bool = True,
    binary_type: str = "trie",
    memory: str = "20%",
    overwrite: bool = False,
    log=None,
) -> dict:
    """Builds an LM folder (see :mod:`qn_keras.lm.folder`) at ``out`` from text files;
    returns its ``lm.json``. The folder appears whole or not at all."""
    tokenizer = tokenizer or CharTokenizer()
    if not 1 <= int(order) <= MAX_ORDER:
        raise UserInputError(f"--order must be 1..{MAX_ORDER} (got {order})")
    if binary_type not in BINARY_TYPES:
        raise UserInputError(f"binary type must be one of {BINARY_TYPES} (got {binary_type!r})")
    thresholds = check_prune(prune, int(order))
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if not texts:
        raise UserInputError("No LM text given (--text FILE)")
    lmplz = find_kenlm_tool("lmplz")
    build_binary = find_kenlm_tool("build_binary") if binary else None
    say = log or (lambda message: None)

    with files.atomic_directory(out, replace=overwrite) as tmp:
        scratch = Path(tempfile.mkdtemp(prefix="lmplz-", dir=tmp))
        started = time.monotonic()
        text_file = scratch / "corpus.txt"
        stats = corpus.write_corpus(texts, tokenizer, text_file)
        normalized_s = time.monotonic() - started
        say(
            f"normalized {stats.lines:,} lines, {stats.words:,} words "
            f"({len(stats.word_counts):,} distinct), dropped "
            f"{sum(stats.dropped_chars.values()):,} characters outside the labels"
        )
        command = [
            lmplz, "-o", str(int(order)), "--text", str(text_file), "--arpa", str(tmp / ARPA_FILE),
            "-S", memory, "-T", str(scratch), "--discount_fallback",
        ]  # fmt: skip
        if thresholds:
            command += ["--prune", *map(str, thresholds)]
        estimate_started = time.monotonic()
        _run(command, "lmplz", scratch / "lmplz.log")
        estimate_s = time.monotonic() - estimate_started
        binary_s = None
        if build_binary:
            binary_started = time.monotonic()
            _run(
                [build_binary, "-s", binary_type, str(tmp / ARPA_FILE), str(tmp / BINARY_FILE)],
                "build_binary",
                scratch / "build_binary.log",
            )
            binary_s = time.monotonic() - binary_started
        files.write_text(tmp / UNIGRAMS_FILE, "\n".join(corpus.unigram_list(stats.word_counts)))
        shutil.rmtree(scratch)
        metadata = {
            "format": "qn-lm",
            "version": 1,
            "order": int(order),
            "prune": thresholds or [],
            "estimator": "KenLM lmplz (modified Kneser-Ney, --discount_fallback)",
            "binary": {"file": BINARY_FILE, "type": binary_type} if build_binary else None,
            "labels": list(tokenizer.labels),
            "ngrams": _ngram_counts(tmp / ARPA_FILE),
            "text": stats.to_json(),
            "seconds": {
                "normalize": round(normalized_s, 2),
                "estimate": round(estimate_s, 2),
                "binarize": round(binary_s, 2) if binary_s is not None else None,
            },
            "bytes": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        files.write_json(tmp / LM_JSON, metadata)
    return metadata
