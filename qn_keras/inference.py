"""In-graph speech recognition: waveform in, features, model, greedy decoding, text out.

Only core TensorFlow ops, so the exported SavedModel runs in stock TF Serving (and the
waveform-to-logprobs part converts to TFLite). The serving package builds TF Serving version
folders, warmup requests and more signatures on top of :class:`SpeechRecognizer`.
"""

from __future__ import annotations

import types

import tensorflow as tf

from qn_keras.decoding import tf_greedy_decode
from qn_keras.featurizer import LogMelSpectrogram

WAVEFORM_SPEC = tf.TensorSpec([None, None], tf.float32, name="waveform")
LENGTHS_SPEC = tf.TensorSpec([None], tf.int32, name="lengths")


def model_stride(model: tf.keras.Model) -> int:
    """Feature frames per output frame (2 for QuartzNet, 4 for the ContextNet preset)."""
    stride = 1
    for s in getattr(model, "block_args", {}).get("stackwise_strides", [2]):
        stride *= int(s)
    return stride


class SpeechRecognizer(tf.Module):
    """Waveforms (16 kHz float32 ``[batch, samples]``) and lengths to transcripts.

    ``serving_default`` returns ``transcripts`` string ``[batch]``, ``logprobs`` float32
    ``[batch, frames, vocabulary_size]`` and ``logprob_lengths`` int32 ``[batch]``.

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

    def __init__(self, bundle, name=None):
        super().__init__(name=name)
        # The bundle's own front end: imported NeMo models carry their filterbank and window.
        featurizer = bundle.featurizer_layer()
        # A plain namespace is not tracked by tf.Module, so saving skips Keras serialization.
        self._runtime = types.SimpleNamespace(model=bundle.model, featurizer=featurizer)
        self.model_variables = list(bundle.model.variables)
        self.labels = list(bundle.tokenizer.labels)
        self.sample_rate = int(bundle.featurizer.sample_rate)
        self.num_mels = int(bundle.featurizer.num_mels)
        self.stride = model_stride(bundle.model)

    @property
    def model(self) -> tf.keras.Model:
        return self._runtime.model

    @property
    def featurizer(self) -> LogMelSpectrogram:
        return self._runtime.featurizer

    def logprobs(self, waveform, lengths):
        features, feature_lengths = self.featurizer(waveform, lengths, training=False)
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
