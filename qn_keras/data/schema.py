"""THE TFRecord schema of featurized utterances: written by the Beam pipeline, read by the
trainer's ``tf.data`` reader and by anything that serves or inspects the data.

Each record is a ``tf.train.Example`` with:

====================  =========  ===========================================================
key                   type       value
====================  =========  ===========================================================
``features``          float32    log-mel features ``[frames, num_mels]``, row-major, flattened
``feature_length``    int64      frames (rows of ``features``)
``num_mels``          int64      columns of ``features``
``labels``            int64      token ids of the normalized transcript
``transcript``        bytes      normalized transcript, UTF-8
``duration``          float32    seconds of audio the features were computed from
``utt_id``            bytes      utterance id (speed-perturbed copies carry a ``_sp<rate>``
                                 suffix)
``source``            bytes      the audio file the utterance was read from
====================  =========  ===========================================================

Features are stored as float32: the features are normalized to unit variance, and float16's
11-bit mantissa would put a relative error of up to 5e-4 on every value, more than the 1e-4
the featurizer is held to against NeMo.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

FEATURES = "features"
FEATURE_LENGTH = "feature_length"
NUM_MELS = "num_mels"
LABELS = "labels"
TRANSCRIPT = "transcript"
DURATION = "duration"
UTT_ID = "utt_id"
SOURCE = "source"

SCHEMA_VERSION = 1


def feature_spec() -> dict:
    """The ``tf.io.parse_example`` spec of one record."""
    return {
        FEATURES: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
        FEATURE_LENGTH: tf.io.FixedLenFeature([], tf.int64),
        NUM_MELS: tf.io.FixedLenFeature([], tf.int64),
        LABELS: tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True),
        TRANSCRIPT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        DURATION: tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
        UTT_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
        SOURCE: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _float_list(values: np.ndarray) -> tf.train.FloatList:
    # FloatList(value=array) converts element by element (~10 ms for 3 s of audio, more than
    # featurizing it); parsing the packed wire form (field 1, length, little-endian floats)
    # gives the identical message in a fraction of that.
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return tf.train.FloatList.FromString(b"\x0a" + _varint(len(raw)) + raw)


def _bytes(value: str) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode("utf-8")]))


def serialize_utterance(
    features: np.ndarray,
    labels,
    transcript: str,
    duration: float,
    utt_id: str,
    source: str,
) -> bytes:
    """One serialized ``tf.train.Example`` holding a featurized utterance.

    Args:
        features: ``[frames, num_mels]`` float array (valid frames only).
        labels: token ids of ``transcript``.
        transcript: the normalized transcript the labels encode.
        duration: seconds of audio.
        utt_id: utterance id.
        source: path of the audio file.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be [frames, num_mels]; received shape {features.shape}")
    feature = {
        FEATURES: tf.train.Feature(float_list=_float_list(features.reshape(-1))),
        FEATURE_LENGTH: tf.train.Feature(int64_list=tf.train.Int64List(value=[features.shape[0]])),
        NUM_MELS: tf.train.Feature(int64_list=tf.train.Int64List(value=[features.shape[1]])),
        LABELS: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(i) for i in labels])),
        TRANSCRIPT: _bytes(transcript),
        DURATION: tf.train.Feature(float_list=tf.train.FloatList(value=[float(duration)])),
        UTT_ID: _bytes(utt_id),
        SOURCE: _bytes(source),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


PROBLEM = "problem"  # parse-time check result (qn_keras.data.validation); "" if usable


def parse_example(
    serialized: tf.Tensor, num_mels: int | None = None, num_labels: int | None = None
) -> dict:
    """Parses one serialized record (a scalar string tensor) into a dict of tensors.

    ``num_mels``, when given, makes the features' last dimension static (Keras layers need it);
    otherwise it is read from the record. Returns ``features`` float32 ``[frames, num_mels]``,
    ``feature_length`` int32, ``labels`` int32 ``[tokens]``, ``label_length`` int32,
    ``transcript``, ``utt_id`` and ``source`` strings, ``duration`` float32, and ``problem``:
    ``""`` for a usable record, else what is wrong with it (see
    :mod:`qn_keras.data.validation`; ``num_labels`` bounds the label ids). A record whose
    values do not reshape still parses (its features are cut to whole frames) so that the
    problem can name it. Works eagerly and inside ``Dataset.map``.
    """
    from qn_keras.data import validation

    parsed = tf.io.parse_single_example(serialized, feature_spec())
    stored_mels = tf.cast(parsed[NUM_MELS], tf.int32)
    width = stored_mels if num_mels is None else tf.constant(int(num_mels))
    flat = parsed[FEATURES]
    size = tf.size(flat)
    rows = size // tf.maximum(width, 1)
    features = tf.reshape(flat[: rows * tf.maximum(width, 1)], [-1, tf.maximum(width, 1)])
    if num_mels is not None:
        features = tf.ensure_shape(features, [None, int(num_mels)])
    feature_length = tf.cast(parsed[FEATURE_LENGTH], tf.int32)
    labels = tf.cast(parsed[LABELS], tf.int32)
    problem = validation.record_problem(
        size, stored_mels, width, features, feature_length, labels, num_labels
    )
    return {
        FEATURES: features,
        FEATURE_LENGTH: feature_length,
        LABELS: labels,
        "label_length": tf.size(labels, out_type=tf.int32),
        TRANSCRIPT: parsed[TRANSCRIPT],
        DURATION: parsed[DURATION],
        UTT_ID: parsed[UTT_ID],
        SOURCE: parsed[SOURCE],
        PROBLEM: problem,
    }


def parse_example_numpy(serialized: bytes) -> dict:
    """Pure-protobuf parse of one record to NumPy values, for tools and tests without a graph."""
    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    num_mels = feature[NUM_MELS].int64_list.value[0]
    values = np.asarray(feature[FEATURES].float_list.value, dtype=np.float32)
    return {
        FEATURES: values.reshape(-1, num_mels),
        FEATURE_LENGTH: int(feature[FEATURE_LENGTH].int64_list.value[0]),
        LABELS: [int(i) for i in feature[LABELS].int64_list.value],
        TRANSCRIPT: feature[TRANSCRIPT].bytes_list.value[0].decode("utf-8"),
        DURATION: float(feature[DURATION].float_list.value[0]),
        UTT_ID: feature[UTT_ID].bytes_list.value[0].decode("utf-8"),
        SOURCE: feature[SOURCE].bytes_list.value[0].decode("utf-8"),
    }
