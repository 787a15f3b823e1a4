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
    """The message of the first failing ``(is_bad, message_fn)`` check, or ``""``. Messages
    are formatted only when some check fails (one cond), so a good record costs the checks."""

    def describe():
        problem = tf.constant("")
        for is_bad, message in reversed(checks):
            problem = tf.where(is_bad, message(), problem)
        return problem

    any_bad = tf.reduce_any(tf.stack([is_bad for is_bad, _ in checks]))
    return tf.cond(any_bad, describe, lambda: tf.constant(""))


def _str(value) -> tf.Tensor:
    return tf.strings.as_string(value)


def _layout_checks(size, stored_mels, width) -> list:
    """Features stored as ``size`` values with ``stored_mels`` columns, read as ``width``."""
    safe = tf.maximum(width, 1)
    return [
        (
            tf.not_equal(stored_mels, width),
            lambda: tf.strings.join(
                ["num_mels ", _str(stored_mels), " where ", _str(width), " is expected"]
            ),
        ),
        (
            tf.logical_or(width <= 0, tf.not_equal(size % safe, 0)),
            lambda: tf.strings.join(
                [_str(size), " feature values do not fill whole frames of ", _str(width)]
            ),
        ),
    ]


def _feature_checks(features, feature_length=None) -> list:
    frames = tf.shape(features)[0]
    bad_values = tf.size(features) - tf.math.count_nonzero(
        tf.math.is_finite(features), dtype=tf.int32
    )
    checks = []
    if feature_length is not None:
        feature_length = tf.cast(feature_length, tf.int32)
        checks.append(
            (
                tf.not_equal(feature_length, frames),
                lambda: tf.strings.join(
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
    return checks + [
        (tf.equal(frames, 0), lambda: tf.constant("no feature frames")),
        (
            bad_values > 0,
            lambda: tf.strings.join(
                [
                    _str(bad_values),
                    " non-finite feature values (NaN or infinite) of ",
                    _str(tf.size(features)),
                ]
            ),
        ),
    ]


def _label_checks(labels, num_labels: int | None) -> list:
    labels = tf.cast(labels, tf.int32)
    checks = [(tf.reduce_any(labels < 0), lambda: tf.constant("negative label id"))]
    if num_labels is not None:
        top = tf.reduce_max(tf.concat([labels, [-1]], 0))
        checks.append(
            (
                top >= num_labels,
                lambda: tf.strings.join(
                    [
                        "label id ",
                        _str(top),
                        f" outside the vocabulary (ids 0..{num_labels - 1}; the features were "
                        "made with other labels?)",
                    ]
                ),
            )
        )
    return checks


def feature_problem(features, feature_length=None) -> tf.Tensor:
    """The problem of one utterance's features ``[frames, num_mels]`` (``""`` if none)."""
    return _first_problem(_feature_checks(features, feature_length))


def label_problem(labels, num_labels: int | None) -> tf.Tensor:
    """The problem of one utterance's label ids (``""`` if none)."""
    return _first_problem(_label_checks(labels, num_labels))


def record_problem(
    size, stored_mels, width, features, feature_length, labels, num_labels
) -> tf.Tensor:
    """The first problem of a parsed record: its layout (``size`` values stored with
    ``stored_mels`` columns, read as ``width``), its features, its labels; ``""`` if none."""
    return _first_problem(
        _layout_checks(size, stored_mels, width)
        + _feature_checks(features, feature_length)
        + _label_checks(labels, num_labels)
    )


def assert_usable(problem, utt_id, source) -> tf.Operation:
    """An assertion that fails with ``qn-corrupt-record: utterance 'ID' in FILE: PROBLEM``."""
    ok = tf.equal(problem, "")
    message = tf.cond(
        ok,
        lambda: tf.constant(""),
        lambda: tf.strings.join(
            [CORRUPT_RECORD, ": utterance '", utt_id, "' in ", source, ": ", problem]
        ),
    )
    return tf.debugging.Assert(ok, [message])


_MESSAGE = re.compile(re.escape(CORRUPT_RECORD) + r": (.*?)\]?(?:\n|$)")


def corrupt_record_message(error: BaseException) -> str | None:
    """The record's message if ``error`` came from :func:`assert_usable`, else None."""
    text = getattr(error, "message", None) or str(error)
    match = _MESSAGE.search(text)
    # The assertion's printout escapes quotes.
    return match.group(1).replace("\\'", "'") if match else None
