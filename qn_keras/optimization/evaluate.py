"""Utterance-by-utterance transcription and scoring of Keras and TFLite models.

One utterance at a time (batch 1, no padding): the integer TFLite models are exported for that
case (see :mod:`qn_keras.optimization.tflite`), and the Keras model then sees exactly the same
input, so their transcripts can be compared one to one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras.data import schema
from qn_keras.decoding import greedy_decode_ids
from qn_keras.metrics import cer, wer


@dataclasses.dataclass
class Utterance:
    utt_id: str
    features: np.ndarray  # [frames, num_features] float32, valid frames only
    reference: str


def load_features(data, bundle, cache_dir, *, limit: int | None = None) -> list[Utterance]:
    """Features and reference transcripts of a manifest or ``qn features`` folder.

    A manifest is featurized once with the model's own front end and vocabulary (cached in
    ``cache_dir`` by the trainer's data module); TFRecords are checked against them.
    """
    from qn_keras.training.data import open_data

    source = open_data(data, bundle.tokenizer, bundle.featurizer, Path(cache_dir))
    dataset = source.dataset(1, training=False, with_metadata=True)
    out = []
    for (features, lengths), _, meta in dataset:
        n = int(lengths[0])
        out.append(
            Utterance(
                utt_id=meta[schema.UTT_ID][0].numpy().decode("utf-8"),
                features=features[0, :n].numpy(),
                reference=meta[schema.TRANSCRIPT][0].numpy().decode("utf-8"),
            )
        )
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{data}: no utterances.")
    return out


def keras_logprobs(model: tf.keras.Model):
    """``features [frames, F] -> logprobs [frames', V]`` through a Keras model, one utterance."""
    num_features = model.inputs[0].shape[-1]

    @tf.function(
        input_signature=[tf.TensorSpec([1, None, num_features], tf.float32)], reduce_retracing=True
    )
    def run(features):
        lengths = tf.fill([1], tf.shape(features)[1])
        logprobs, logprob_lengths = model([features, lengths], training=False)
        return logprobs[0], logprob_lengths[0]

    def call(features):
        logprobs, length = run(np.asarray(features, np.float32)[None])
        return logprobs.numpy()[: int(length)]

    return call


def transcribe(logprobs_fn, utterances: list[Utterance], tokenizer, progress=None) -> list[str]:
    """Greedy transcripts of ``utterances`` through ``logprobs_fn`` (Keras or TFLite)."""
    hyps = []
    for utt in utterances:
        logprobs = logprobs_fn(utt.features)
        ids = greedy_decode_ids(logprobs, len(logprobs), tokenizer.blank_id)
        hyps.append(tokenizer.decode(ids))
        if progress is not None:
            progress.update(1)
    return hyps


def score(utterances: list[Utterance], hypotheses: list[str]) -> dict:
    refs = [u.reference for u in utterances]
    return {"wer": wer(refs, hypotheses), "cer": cer(refs, hypotheses), "utterances": len(refs)}


def agreement(a: list[str], b: list[str]) -> float:
    """Fraction of utterances whose two transcripts are identical."""
    if len(a) != len(b) or not a:
        raise ValueError("agreement needs two equally long, non-empty transcript lists.")
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
