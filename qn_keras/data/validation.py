"""Checks that a featurized utterance can be used, made in the graph before anything trains on
it or transcribes it.

Why the trainer cannot rely on NaN reaching the loss: under oneDNN (TensorFlow's default on
x86), Grappler fuses ``FusedBatchNormV3`` + ``Relu`` into one kernel whose ReLU returns 0 for
NaN (``max(x, 0)`` with the NaN operand second). In training mode one NaN feature makes its
whole BatchNorm channel's batch statistics NaN, the fused ReLU turns that channel into zeros,
and the loss comes out finite: the batch is trained on and the moving statistics are NaN from
then on. (Measured with TF 2.15.1 on AMD EPYC and Intel Xeon CPUs with AVX-512, also with
``ONEDNN_MAX_CPU_ISA=AVX2``; with ``TF_ENABLE_ONEDNN_OPTS=0`` the NaN propagates.) So records
are checked where they are parsed, and a bad one is named.

A record's *problem* is a string scalar, empty when the record is fine, otherwise the first of:

- features that do not reshape to ``[frames, num_mels]``, or another ``num_mels``;
- ``feature_length`` disagreeing with the frames stored, or no frames at all;
- NaN or infinite feature values;
- label ids outside ``[0, num_labels)`` (the blank, id ``num_labels``, is never a target).

:func:`assert_usable` turns a problem into an ``InvalidArgumentError`` carrying
:data:`CORRUPT_RECORD`, the utterance id and the file; :func:`corrupt_record_message` reads that
message back out of the error, so callers can raise :class:`CorruptRecordError`.
"""

from __future__ import annotations

import re

import tensorflow as tf

from qn_keras.errors import UserInputError

CORRUPT_RECORD = "qn-corrupt-record"
BAD_RECORD_POLICIES = ("raise", "keep")


class CorruptRecordError(UserInputError):
    """A record (utterance) cannot be used; the message names it, its file and the problem."""


def _first_problem(checks) -> tf.Tensor:
    """The message of the first failing ``(is_bad, message)`` check, or ``""``."""
    problem = tf.constant("")
    for is_bad, message in reversed(checks):
        problem = tf.where(is_bad, message, problem)
    return problem


def _str(value) -> tf.Tensor:
    return tf.strings.as_string(value)


def feature_problem(features, feature_length=None) -> tf.Tensor:
    """The problem of one utterance's features ``[frames, num_mels]`` (``""`` if none)."""
    frames = tf.shape(features)[0]
    finite = tf.math.is_finite(features)
    bad_values = tf.size(features) - tf.reduce_sum(tf.cast(finite, tf.int32))
    checks = []
    if feature_length is not None:
        feature_length = tf.cast(feature_length, tf.int32)
        checks.append(
            (
                tf.not_equal(feature_length, frames),
                tf.strings.join(
                    [
                        "feature_length ",
                        _str(feature_length),
                        " but ",
                        _str(frames),
                        " frames stored",
                    ]
                ),
            )
        )
    checks += [
        (tf.equal(frames, 0), tf.constant("no feature frames")),
        (
            bad_values > 0,
            tf.strings.join(
                [
                    _str(bad_values),
                    " non-finite feature values (NaN or infinite) of ",
                    _str(tf.size(features)),
                ]
            ),
        ),
    ]
    return _first_problem(checks)


def label_problem(labels, num_labels: int | None) -> tf.Tensor:
    """The problem of one utterance's label ids (``""`` if none)."""
    labels = tf.cast(labels, tf.int32)
    low = tf.reduce_any(labels < 0)
    checks = [(low, tf.constant("negative label id"))]
    if num_labels is not None:
        top = tf.reduce_max(tf.concat([labels, [-1]], 0))
        checks.append(
            (
                top >= num_labels,
                tf.strings.join(
                    [
                        "label id ",
                        _str(top),
                        f" outside the vocabulary (ids 0..{num_labels - 1}; the features were "
                        "made with other labels?)",
                    ]
                ),
            )
        )
    return _first_problem(checks)


def combine(*problems) -> tf.Tensor:
    """The first non-empty problem."""
    return _first_problem([(tf.not_equal(p, ""), p) for p in problems])


def assert_usable(problem, utt_id, source) -> tf.Operation:
    """An assertion that fails with ``qn-corrupt-record: utterance 'ID' in FILE: PROBLEM``."""
    message = tf.strings.join(
        [CORRUPT_RECORD, ": utterance '", utt_id, "' in ", source, ": ", problem]
    )
    return tf.debugging.Assert(tf.equal(problem, ""), [message])


_MESSAGE = re.compile(re.escape(CORRUPT_RECORD) + r": (.*?)\]?(?:\n|$)")


def corrupt_record_message(error: BaseException) -> str | None:
    """The record's message if ``error`` came from :func:`assert_usable`, else None."""
    text = getattr(error, "message", None) or str(error)
    match = _MESSAGE.search(text)
    # The assertion's printout escapes quotes.
    return match.group(1).replace("\\'", "'") if match else None
