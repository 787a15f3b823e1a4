"""CTC loss as NeMo computes it: true lengths, blank last, zero_infinity, ``mean_batch``."""

from __future__ import annotations

import tensorflow as tf


def dense_to_sparse_labels(labels, label_lengths):
    """Padded ``[B, U]`` labels to a SparseTensor holding only the first ``label_lengths[b]``
    ids of each row (so padding, whatever its value, is never read as a label)."""
    labels = tf.cast(labels, tf.int32)
    mask = tf.sequence_mask(label_lengths, tf.shape(labels)[1])
    indices = tf.where(mask)
    return tf.SparseTensor(indices, tf.gather_nd(labels, indices), tf.shape(labels, tf.int64))


def ctc_per_utterance(labels, label_lengths, logprobs, logprob_lengths):
    """Per-utterance CTC negative log-likelihoods ``[B]`` in float32.

    ``logprobs`` ``[B, T, V]`` (log-softmax outputs; the blank is class ``V - 1``),
    ``logprob_lengths`` ``[B]``, ``labels`` ``[B, U]`` padded, ``label_lengths`` ``[B]``.

    Uses TensorFlow's CTC kernel on sparse labels (its blank is the last class, our
    convention). Like NeMo's ``zero_infinity=True``, an utterance whose transcript cannot fit
    in its frames contributes 0 (and no gradient) instead of infinity.
    """
    logprobs = tf.cast(logprobs, tf.float32)
    sparse = dense_to_sparse_labels(labels, label_lengths)
    losses = tf.compat.v1.nn.ctc_loss(
        labels=sparse,
        inputs=logprobs,
        sequence_length=tf.cast(logprob_lengths, tf.int32),
        time_major=False,
        ctc_merge_repeated=True,
        # Transcripts longer than their frames: loss 0, gradient 0 (zero_infinity).
        ignore_longer_outputs_than_inputs=True,
    )
    # Repeated labels need a blank between them; when that does not fit the kernel returns
    # inf with a zero gradient. zero_infinity maps it to 0; NaN is left for the trainer to see.
    return tf.where(tf.math.is_inf(losses), tf.zeros_like(losses), losses)


def ctc_loss_mean_batch(labels, label_lengths, logprobs, logprob_lengths):
    """NeMo's default ``ctc_reduction='mean_batch'``: the mean over the batch of per-utterance
    summed losses (not divided by transcript length)."""
    return tf.reduce_mean(ctc_per_utterance(labels, label_lengths, logprobs, logprob_lengths))
