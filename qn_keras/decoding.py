"""Greedy and beam CTC decoding that respect output lengths; blank is the last class."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def greedy_decode_ids(logprobs: np.ndarray, length: int, blank_id: int) -> list[int]:
    """NeMo's greedy rule for one utterance: argmax per frame up to ``length``, merge repeats,
    drop blanks. ``logprobs`` ``[frames, classes]``."""
    best = np.argmax(np.asarray(logprobs)[: int(length)], axis=-1)
    out, previous = [], blank_id
    for p in best.tolist():
        if p != blank_id and p != previous:
            out.append(p)
        previous = p
    return out


def greedy_decode_batch(logprobs, lengths, blank_id: int) -> list[list[int]]:
    logprobs = np.asarray(logprobs)
    return [greedy_decode_ids(logprobs[b], lengths[b], blank_id) for b in range(len(logprobs))]


def tf_greedy_decode(logprobs, lengths, labels) -> tf.Tensor:
    """Greedy decoding inside a TF graph (core ops only): transcripts as a string ``[batch]``.

    ``labels`` are the label characters; the blank is index ``len(labels)``.
    """
    blank_id = len(labels)
    best = tf.argmax(logprobs, axis=-1, output_type=tf.int32)  # [B, T]
    valid = tf.sequence_mask(lengths, maxlen=tf.shape(best)[1])
    previous = tf.pad(best[:, :-1], [[0, 0], [1, 0]], constant_values=blank_id)
    keep = valid & tf.not_equal(best, blank_id) & tf.not_equal(best, previous)
    table = tf.constant(list(labels) + [""], dtype=tf.string)
    chars = tf.where(keep, tf.gather(table, best), tf.constant("", tf.string))
    return tf.strings.reduce_join(chars, axis=1)


def _accumulator(candidates: dict):
    def add(prefix, pb, pnb):
        old_b, old_nb = candidates.get(prefix, (-np.inf, -np.inf))
        candidates[prefix] = (np.logaddexp(old_b, pb), np.logaddexp(old_nb, pnb))

    return add


def beam_decode_ids(logprobs: np.ndarray, length: int, blank_id: int, beam_width: int = 8):
    """CTC prefix beam search without a language model; returns the best label-id sequence."""
    if int(beam_width) < 1:
        raise ValueError(f"beam_width must be >= 1. Received: {beam_width}")
    logprobs = np.asarray(logprobs, dtype=np.float64)[: int(length)]
    # prefix -> (log p ending in blank, log p ending in non-blank)
    beams = {(): (0.0, -np.inf)}
    for frame in logprobs:
        candidates: dict = {}
        add = _accumulator(candidates)

        top = np.argsort(frame)[::-1][: max(beam_width, 2)]
        for prefix, (pb, pnb) in beams.items():
            total = np.logaddexp(pb, pnb)
            for c in top.tolist():
                p = frame[c]
                if c == blank_id:
                    add(prefix, total + p, -np.inf)
                    continue
                last = prefix[-1] if prefix else None
                new_prefix = prefix + (c,)
                if c == last:
                    add(new_prefix, -np.inf, pb + p)
                    add(prefix, -np.inf, pnb + p)
                else:
                    add(new_prefix, -np.inf, total + p)
        beams = dict(sorted(candidates.items(), key=lambda kv: -np.logaddexp(*kv[1]))[:beam_width])
    best = max(beams.items(), key=lambda kv: np.logaddexp(*kv[1]))
    return list(best[0])


class PrefixBeamSearch:
    """:func:`beam_decode_ids` as a decoder object (``decode_texts`` over a padded batch)."""

    def __init__(self, labels, beam_width: int):
        self.labels = tuple(labels)
        self.beam_width = int(beam_width)

    def decode_texts(self, logprobs, lengths) -> list[str]:
        blank = len(self.labels)
        return [
            "".join(self.labels[i] for i in beam_decode_ids(lp, n, blank, self.beam_width))
            for lp, n in zip(logprobs, lengths, strict=True)
        ]
