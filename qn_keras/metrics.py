"""Word and character error rates (Levenshtein distance over words or characters)."""

from __future__ import annotations


def edit_distance(reference, hypothesis) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions)."""
    ref, hyp = list(reference), list(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edit distance, reference word count)."""
    ref = reference.split()
    return edit_distance(ref, hypothesis.split()), len(ref)


def char_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(character edit distance, reference character count), spaces collapsed."""
    ref, hyp = " ".join(reference.split()), " ".join(hypothesis.split())
    return edit_distance(ref, hyp), len(ref)


def _rate(pairs, errors_fn) -> float:
    errors = total = 0
    for ref, hyp in pairs:
        e, n = errors_fn(ref, hyp)
        errors += e
        total += n
    if total == 0:
        raise ValueError("Error rate is undefined: the references are all empty.")
    return errors / total


def wer(references, hypotheses) -> float:
    """Corpus word error rate: total word edits / total reference words."""
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses.")
    return _rate(zip(references, hypotheses, strict=True), word_errors)


def cer(references, hypotheses) -> float:
    """Corpus character error rate: total character edits / total reference characters."""
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses.")
    return _rate(zip(references, hypotheses, strict=True), char_errors)
