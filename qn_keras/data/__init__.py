"""Corpora in, ``tf.data`` out: manifest readers, the TFRecord schema and dataset readers.

Imports TensorFlow, NumPy and the standard library only (never Beam), so the trainer, the
evaluator and serving share these modules with the Beam pipeline.
"""

from qn_keras.data.dataset_info import read_dataset_info
from qn_keras.data.manifest import (
    BAD_MANIFEST_LINE,
    ManifestFailure,
    Utterance,
    load_utterances,
    read_utterances,
)
from qn_keras.data.reader import manifest_dataset, tfrecord_dataset
from qn_keras.data.text import OOV_POLICIES, TranscriptError, tokenize_transcript
from qn_keras.data.validation import CorruptRecordError

__all__ = [
    "BAD_MANIFEST_LINE",
    "CorruptRecordError",
    "OOV_POLICIES",
    "ManifestFailure",
    "TranscriptError",
    "Utterance",
    "load_utterances",
    "manifest_dataset",
    "read_dataset_info",
    "read_utterances",
    "tfrecord_dataset",
    "tokenize_transcript",
]
