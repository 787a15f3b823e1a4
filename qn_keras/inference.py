"""In-graph speech recognition: waveform in, features, model, greedy decoding, text out.

Only core TensorFlow ops, so the exported SavedModel runs in stock TF Serving (and the
waveform-to-logprobs part converts to TFLite). The serving package builds TF Serving version
folders, warmup requests and more signatures on top of :class:`SpeechRecognizer`.
"""

from __future__ import annotations

import re
import types

import tensorflow as tf

from qn_keras.decoding import tf_greedy_decode
from qn_keras.errors import UserInputError
from qn_keras.featurizer import LogMelSpectrogram
from qn_keras.inference_graph import InferenceEncoder, bfloat16_supported, unsupported_reason
from qn_keras.quartznet_backbone import output_stride

WAVEFORM_SPEC = tf.TensorSpec([None, None], tf.float32, name="waveform")
LENGTHS_SPEC = tf.TensorSpec([None], tf.int32, name="lengths")


def refusal_message(error: tf.errors.OpError) -> str:
    """The readable part of an InvalidArgumentError from a graph check: the assertion's text
    (``assertion failed: [TEXT]``), else the message without TensorFlow's node annotations."""
    text = error.message
    if "assertion failed: [" in text:
        line = text.split("assertion failed: ", 1)[1].split("\n", 1)[0].strip()
        return " ".join(line[1:-1].split("] ["))
    return re.sub(r"\s*\[\[.*", "", re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)).strip()


def _items(bad: tf.Tensor) -> tf.Tensor:
    """``"0, 3"``: the batch indices where ``bad`` is true."""
    indices = tf.where(bad)[:, 0]
    return tf.strings.reduce_join(tf.strings.as_string(indices), separator=", ")


def _check(bad: tf.Tensor, what: tf.Tensor | str, problem: str) -> tf.Operation:
    """An assertion failing with ``{what} {items}: {problem}`` (InvalidArgumentError, which
    TF Serving answers as 400 / INVALID_ARGUMENT)."""
    text = tf.strings.join([what, " ", _items(bad), ": ", problem])
    return tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [text])


def request_checks(waveform, lengths, min_samples: int, sample_rate: int) -> list:
    """Assertions on a ``serving_default`` request, in the graph so that they hold wherever
    the SavedModel runs: one length per waveform, lengths in ``[min_samples, samples]``, and
    finite samples within each length. Without them a NaN waveform, a negative length or a
    length past the samples given would come back as a confident transcript."""
    samples = tf.shape(waveform)[1]
    batch = tf.debugging.assert_equal(
        tf.shape(lengths)[0],
        tf.shape(waveform)[0],
        message="lengths must hold one length per waveform row (batch sizes differ)",
    )
    with tf.control_dependencies([batch]):
        lengths = tf.identity(lengths)
    ms = 1000 * min_samples / sample_rate
    bounds = [
        _check(lengths < 0, "lengths of item(s)", "negative length"),
        _check(
            lengths > samples,
            "lengths of item(s)",
            tf.strings.join(
                ["length exceeds the ", tf.strings.as_string(samples), " samples given"]
            ),
        ),
        _check(
            tf.logical_and(lengths >= 0, lengths < min_samples),
            "audio of item(s)",
            f"shorter than {min_samples} samples at {sample_rate} Hz ({ms:.0f} ms), too short "
            "to transcribe",
        ),
    ]
    # Samples past each length are padding and may hold anything; only valid ones must be
    # finite. (The bounds are checked first: sequence_mask needs sane lengths.)
    with tf.control_dependencies(bounds):
        valid = tf.sequence_mask(tf.clip_by_value(lengths, 0, samples), samples)
        finite = tf.logical_or(tf.math.is_finite(waveform), tf.logical_not(valid))
    samples_ok = _check(
        tf.logical_not(tf.reduce_all(finite, axis=1)),
        "waveform item(s)",
        "non-finite samples (NaN or infinity)",
    )
    return [batch, *bounds, samples_ok]


# How a refusal for non-finite features starts (callers tell it from the other refusals).
FEATURES_REFUSED = "features of item(s)"


def feature_check(features, feature_lengths) -> tf.Operation:
    """Finite features over each item's valid frames: finite audio far beyond full scale
    overflows the power spectrum, and NaN cannot be relied on to reach the output (oneDNN's
    fused BatchNorm+ReLU maps it to 0; see :mod:`qn_keras.data.validation`)."""
    valid = tf.sequence_mask(feature_lengths, tf.shape(features)[1])[:, :, None]
    finite = tf.logical_or(tf.math.is_finite(features), tf.logical_not(valid))
    return _check(
        tf.logical_not(tf.reduce_all(finite, axis=[1, 2])),
        FEATURES_REFUSED,
        "non-finite values (audio far beyond full scale?)",
    )


def model_stride(model: tf.keras.Model) -> int:
    """Feature frames per output frame (2 for QuartzNet, 4 for the ContextNet preset)."""
    block_args = getattr(model, "block_args", None)
    if block_args:
        return output_stride(block_args)
    # tfmot's quantization and pruning clones are plain Functional models without
    # QuartzNetCTC's attributes: measure the stride from the output length instead.
    frames = 256
    features = tf.zeros([1, frames, model.inputs[0].shape[-1]])
    _, lengths = model([features, tf.constant([frames])], training=False)
    return max(1, round(frames / int(lengths[0])))


class SpeechRecognizer(tf.Module):
    """Waveforms (16 kHz float32 ``[batch, samples]``) and lengths to transcripts.

    ``serving_default`` returns ``transcripts`` string ``[batch]``, ``logprobs`` float32
    ``[batch, frames, vocabulary_size]`` and ``logprob_lengths`` int32 ``[batch]``. A request
    with non-finite samples, a negative length, a length past the samples given, audio
    shorter than two feature frames, or features that come out non-finite fails with
    InvalidArgumentError naming the batch items (:func:`request_checks`).

    Two more functions are saved with it (not signatures, so TF Serving does not expose them)
    for long-audio transcription, which featurizes a file piece by piece and normalises with
    the whole file's statistics: ``log_mel(waveform, lengths)`` (features before per-feature
    normalisation) and ``encode(features, feature_lengths)`` (the acoustic model alone).

    Only the model's variables are tracked, not the Keras objects: the SavedModel holds just
    these functions, which saves and loads several times faster than Keras's per-layer traces.
    The Keras model itself is kept in the model folder's ``model.keras``.

    Args:
        bundle: a :class:`qn_keras.model_dir.ModelBundle`.

    Example:
        >>> recognizer = SpeechRecognizer(bundle)
        >>> out = recognizer.serving_default(tf.zeros([1, 16000]), tf.constant([16000]))
        >>> out["transcripts"].shape
        TensorShape([1])
    """

    def __init__(self, bundle, name=None, rewrite: bool = True, precision: str = "float32"):
        super().__init__(name=name)
        # The bundle's own front end: imported NeMo models carry their filterbank and window.
        featurizer = bundle.featurizer_layer()
        # A plain namespace is not tracked by tf.Module, so saving skips Keras serialization.
        self._runtime = types.SimpleNamespace(model=bundle.model, featurizer=featurizer)
        # The encoder runs as qn_keras.inference_graph rewrites it (BN folded, fast layout,
        # fewer masks) where it can; the reason it cannot is kept for the export metadata.
        self.rewrite_refused = "disabled" if not rewrite else unsupported_reason(bundle.model)
        self.precision = precision
        if precision != "float32":
            why = self.rewrite_refused or bfloat16_supported()
            if why:
                raise UserInputError(f"Cannot serve this model in {precision}: {why}.")
        if self.rewrite_refused is None:
            self.inference_encoder = InferenceEncoder(bundle.model, compute_dtype=precision)
        else:
            self.model_variables = list(bundle.model.variables)
        self.labels = list(bundle.tokenizer.labels)
        self.sample_rate = int(bundle.featurizer.sample_rate)
        self.min_samples = int(bundle.featurizer.min_samples)
        self.num_mels = int(bundle.featurizer.num_mels)
        self.stride = model_stride(bundle.model)

    @property
    def model(self) -> tf.keras.Model:
        return self._runtime.model

    @property
    def featurizer(self) -> LogMelSpectrogram:
        return self._runtime.featurizer

    def logprobs(self, waveform, lengths):
        checks = request_checks(waveform, lengths, self.min_samples, self.sample_rate)
        with tf.control_dependencies(checks):
            waveform = tf.identity(waveform)
        features, feature_lengths = self.featurizer(waveform, lengths, training=False)
        with tf.control_dependencies([feature_check(features, feature_lengths)]):
            features = tf.identity(features)
        # A call to the `encode` tf.function, not a second inlined copy of the model: every
        # signature shares one traced model, which halves export time and SavedModel size.
        encoded = self.encode(features, feature_lengths)
        return encoded["logprobs"], encoded["logprob_lengths"]

    def outputs(self, logprobs, logprob_lengths) -> dict:
        return {
            "transcripts": tf_greedy_decode(logprobs, logprob_lengths, self.labels),
            "logprobs": logprobs,
            "logprob_lengths": logprob_lengths,
        }

    @tf.function(input_signature=[WAVEFORM_SPEC, LENGTHS_SPEC])
    def serving_default(self, waveform, lengths):
        return self.outputs(*self.logprobs(waveform, lengths))

    @tf.function(input_signature=[WAVEFORM_SPEC, LENGTHS_SPEC])
    def log_mel(self, waveform, lengths):
        log_mel, feature_lengths = self.featurizer.log_mel(waveform, lengths, training=False)
        return {"log_mel": log_mel, "feature_lengths": feature_lengths}

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.float32, name="features"),
            tf.TensorSpec([None], tf.int32, name="feature_lengths"),
        ]
    )
    def encode(self, features, feature_lengths):
        if self.rewrite_refused is None:
            logprobs, logprob_lengths = self.inference_encoder(features, feature_lengths)
        else:
            logprobs, logprob_lengths = self.model([features, feature_lengths], training=False)
        return {"logprobs": logprobs, "logprob_lengths": logprob_lengths}


def save_serving_model(path, bundle, signatures=None, module: SpeechRecognizer | None = None):
    """Saves a SavedModel whose ``serving_default`` is :meth:`SpeechRecognizer.serving_default`.

    ``signatures(module)`` may add more signatures; ``module`` replaces the default
    :class:`SpeechRecognizer` (a subclass with more functions, say).
    """
    module = module or SpeechRecognizer(bundle)
    sigs = {"serving_default": module.serving_default.get_concrete_function()}
    sigs.update(signatures(module) if signatures else {})
    tf.saved_model.save(module, str(path), signatures=sigs)
    return path
