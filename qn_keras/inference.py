"""In-graph speech recognition: waveform in, features, model, greedy decoding, text out.

Only core TensorFlow ops, so the exported SavedModel runs in stock TF Serving (and the
waveform-to-logprobs part converts to TFLite). The serving package builds TF Serving version
folders, warmup requests and more signatures on top of :class:`SpeechRecognizer`.
"""

from __future__ import annotations

import tensorflow as tf

from qn_keras.decoding import tf_greedy_decode
from qn_keras.featurizer import LogMelSpectrogram

WAVEFORM_SPEC = tf.TensorSpec([None, None], tf.float32, name="waveform")
LENGTHS_SPEC = tf.TensorSpec([None], tf.int32, name="lengths")


class SpeechRecognizer(tf.Module):
    """Waveforms (16 kHz float32 ``[batch, samples]``) and lengths to transcripts.

    ``serving_default`` returns ``transcripts`` string ``[batch]``, ``logprobs`` float32
    ``[batch, frames, vocabulary_size]`` and ``logprob_lengths`` int32 ``[batch]``.
    """

    def __init__(self, bundle, name=None):
        super().__init__(name=name)
        self.model = bundle.model
        self.featurizer = LogMelSpectrogram(**bundle.featurizer.to_dict())
        self.labels = list(bundle.tokenizer.labels)
        self.sample_rate = tf.constant(bundle.featurizer.sample_rate, tf.int32)

    def logprobs(self, waveform, lengths):
        features, feature_lengths = self.featurizer(waveform, lengths, training=False)
        logprobs, logprob_lengths = self.model([features, feature_lengths], training=False)
        return logprobs, logprob_lengths

    @tf.function(input_signature=[WAVEFORM_SPEC, LENGTHS_SPEC])
    def serving_default(self, waveform, lengths):
        logprobs, logprob_lengths = self.logprobs(waveform, lengths)
        transcripts = tf_greedy_decode(logprobs, logprob_lengths, self.labels)
        return {
            "transcripts": transcripts,
            "logprobs": logprobs,
            "logprob_lengths": logprob_lengths,
        }


def save_serving_model(path, bundle, signatures=None):
    """Saves a SavedModel whose ``serving_default`` is :meth:`SpeechRecognizer.serving_default`."""
    module = SpeechRecognizer(bundle)
    sigs = {"serving_default": module.serving_default.get_concrete_function()}
    sigs.update(signatures(module) if signatures else {})
    tf.saved_model.save(module, str(path), signatures=sigs)
    return path
