"""TFLite export: a waveform in, log-probabilities out, for on-device inference.

The ``.tflite`` holds the featurizer and the acoustic model (builtin TFLite ops only, no Flex
delegate needed): input ``waveform`` float32 ``[1, samples]`` at the model's sample rate, any
length (resize the input tensor before allocating), output ``logprobs`` float32
``[1, frames, vocabulary]``; greedy decoding of those is a few lines on the device
(:func:`qn_keras.decoding.greedy_decode_ids`). Three variants:

- ``float32``: same numbers as the Keras model (within float rounding);
- ``float16``: weights stored as float16, half the size;
- ``dynamic``: dynamic-range quantization, int8 weights with float activations, a quarter of
  the size (for storage and ARM devices: on the x86 CPUs measured here it runs slower than
  float32, see BENCHMARKS.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras import files
from qn_keras import tflite as lite
from qn_keras.audio import AudioError, check_waveform
from qn_keras.choices import EXPORT_TFLITE_MODES
from qn_keras.errors import UserInputError
from qn_keras.featurizer import FeaturizerConfig, LogMelSpectrogram
from qn_keras.inference_graph import tflite_encoder, unsupported_reason

MODES = EXPORT_TFLITE_MODES
ENGINES = lite.ENGINES


# TFLite's dynamic-range quantizer leaves constant weights under 1024 elements in float.
_MAX_FLOAT_WEIGHTS = 1023


class _BlockwiseMelSpectrogram(LogMelSpectrogram):
    """The same front end, with the mel projection as a sum of matmuls over row blocks small
    enough to stay float32 under dynamic-range quantization: int8 would flatten the power
    spectrum's dynamic range (log-mel errors of several units). Same arithmetic otherwise."""

    def _mel_projection(self, power):
        matrix = self._mel_matrix.numpy()
        rows = max(1, _MAX_FLOAT_WEIGHTS // matrix.shape[1])
        parts = [
            tf.linalg.matmul(power[..., i : i + rows], tf.constant(matrix[i : i + rows]))
            for i in range(0, matrix.shape[0], rows)
        ]
        return tf.add_n(parts)


class _MatmulDftMelSpectrogram(LogMelSpectrogram):
    """The same front end with the windowed DFT as one matmul against a ``[n_fft, 2 * bins]``
    cosine/sine basis (the window folded in): XNNPACK runs it about twice as fast as TFLite's
    RFFT2D kernel (5 against 10 ms for 20 s of audio, 2 threads), and it agrees with
    ``tf.signal.rfft`` to float32 rounding. Only for float graphs (``featurizer.tflite``):
    a quantizer would round the basis to 8 bits."""

    def _power_spectrum(self, frames):
        n_fft = self.config.n_fft
        bins = n_fft // 2 + 1
        angle = 2.0 * np.pi * np.outer(np.arange(n_fft), np.arange(bins)) / n_fft
        window = self._fft_window.numpy().astype(np.float64)[:, None]
        basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window], axis=1)
        spectrum = tf.linalg.matmul(frames, tf.constant(basis.astype(np.float32)))
        return tf.math.square(spectrum[..., :bins]) + tf.math.square(spectrum[..., bins:])


FEATURIZER_FILE = "featurizer.tflite"


def encoder_file(mode: str) -> str:
    """The features-in file of ``mode`` beside ``<mode>.tflite``."""
    return f"encoder_{mode}.tflite"


class WaveformToLogprobs(tf.Module):
    """The TFLite graphs of one waveform ``[1, samples]`` (all valid): ``logprobs`` (waveform
    to log-probabilities, one file), and the same split in two, ``features`` (waveform to the
    valid frames' features) and ``encode`` (features to log-probabilities).

    The split exists for speed: the front end's framing makes shapes TFLite learns only while
    running, and with them XNNPACK leaves every later op to TFLite's slower built-in kernels; an
    encoder whose input is a graph input has every shape fixed once the input is resized.
    The encoder is :func:`qn_keras.inference_graph.tflite_encoder`'s rewrite where the model
    allows (else the Keras graph). Only variables are tracked, not the Keras objects, so the
    converter does not re-trace every Keras layer for its intermediate SavedModel.
    """

    def __init__(self, bundle, name=None):
        super().__init__(name=name)
        featurizer = _BlockwiseMelSpectrogram(
            **bundle.featurizer.to_dict(), filterbank=bundle.filterbank, window=bundle.window
        )
        front = _MatmulDftMelSpectrogram(
            **bundle.featurizer.to_dict(), filterbank=bundle.filterbank, window=bundle.window
        )
        self._runtime = types.SimpleNamespace(
            model=bundle.model, featurizer=featurizer, float_featurizer=front
        )
        # Frames past the audio's end (the front end makes 1 + samples // hop frames, of which
        # num_frames(samples) are valid; the difference is the same for every length): the
        # encoder is given the valid frames only.
        cfg = bundle.featurizer
        self.padded_frames = 2 - cfg.num_frames(cfg.hop_length)  # 1 + hop // hop frames
        if unsupported_reason(bundle.model) is None:
            self.encoder = tflite_encoder(bundle.model)
        else:
            self.encoder = None
            self.model_variables = list(bundle.model.variables)
        spec = tf.TensorSpec([1, None, int(bundle.featurizer.num_mels)], tf.float32, "features")
        self.encode = tf.function(self._encode_signature, input_signature=[spec])

    def _features(self, waveform, featurizer=None):
        lengths = tf.shape(waveform)[1:2]
        featurizer = featurizer or self._runtime.featurizer
        features, feature_lengths = featurizer(waveform, lengths, training=False)
        if self.padded_frames:
            features = features[:, : -self.padded_frames]
        return features, feature_lengths

    def _encode(self, features):
        if self.encoder is not None:
            return self.encoder(features, tf.shape(features)[1:2])[0]
        lengths = tf.shape(features)[1:2]
        return self._runtime.model([features, lengths], training=False)[0]

    @staticmethod
    def _poisoned(values, features):
        # TFLite has no assertions: non-finite features (audio far beyond full scale) must show
        # in the output instead, whatever the kernels do with NaN (fused activations may map it
        # to 0). zero * sum(features) is 0, or NaN exactly when some feature is not finite (NaN
        # and inf survive a sum). The zero comes from the input's length so that no converter
        # can fold it away: Grappler folds 0 * x, TFLite's converter folds x - x.
        frames = tf.shape(features)[1]
        zero = tf.cast(frames // (frames + 1), tf.float32)
        return values + zero * tf.reduce_sum(features)

    @tf.function(input_signature=[tf.TensorSpec([1, None], tf.float32, name="waveform")])
    def logprobs(self, waveform):
        features, _ = self._features(waveform)
        return {"logprobs": self._poisoned(self._encode(features), features)}

    @tf.function(input_signature=[tf.TensorSpec([1, None], tf.float32, name="waveform")])
    def features(self, waveform):
        features, _ = self._features(waveform, self._runtime.float_featurizer)
        return {"features": self._poisoned(features, features)}

    def _encode_signature(self, features):
        return {"logprobs": self._encode(features)}


def convert_tflite(bundle, out_dir, modes=MODES) -> dict[str, Path]:
    """Writes ``out_dir/<mode>.tflite`` and ``out_dir/encoder_<mode>.tflite`` for each mode and
    ``out_dir/featurizer.tflite`` (float32); returns ``{file stem: path}``."""
    modes = list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserInputError(f"Unknown TFLite mode(s) {unknown}; choose from {', '.join(MODES)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = WaveformToLogprobs(bundle)
    signatures = {
        "serving_default": module.logprobs.get_concrete_function(),
        "features": module.features.get_concrete_function(),
        "encode": module.encode.get_concrete_function(),
    }
    # Converting from a SavedModel saved once is several times faster than converting the
    # concrete function once per mode (the converter would save a SavedModel each time).
    staging = Path(tempfile.mkdtemp(prefix=".tflite-staging-", dir=out_dir))
    written = {}
    try:
        tf.saved_model.save(module, str(staging), signatures=signatures)
        blob = lite.convert_saved_model(staging, "float32", signature="features")
        written["featurizer"] = files.write_bytes(out_dir / FEATURIZER_FILE, blob)
        for mode in modes:
            blob = lite.convert_saved_model(staging, mode)
            written[mode] = files.write_bytes(out_dir / f"{mode}.tflite", blob)
            blob = lite.convert_saved_model(staging, mode, signature="encode")
            path = out_dir / encoder_file(mode)
            written[path.stem] = files.write_bytes(path, blob)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


class TFLiteRecognizer:
    """Runs a ``.tflite`` from :func:`convert_tflite` on one waveform at a time.

    Given ``<mode>.tflite`` with ``featurizer.tflite`` and ``encoder_<mode>.tflite`` beside it
    (exports since the inference rewrite), it runs the split pair, which XNNPACK runs about
    twice as fast (see :class:`WaveformToLogprobs`); ``split=False`` runs the one file. Any
    features-in model (``qn optimize``'s int8 ``model.tflite`` say) can stand in for the
    encoder with ``encoder=PATH``.

    The checks the SavedModel makes in its graph are made here around the interpreter: the
    waveform must be finite and at least ``min_samples`` long (default: read from the export's
    ``assets.extra/qn_export.json`` beside the ``tflite/`` folder, else the 16 kHz front end's
    320), and log-probabilities that come out non-finite (the graph turns non-finite
    features into NaN outputs) raise :class:`~qn_keras.audio.AudioError` instead of decoding.

    ``engine``: :data:`qn_keras.tflite.ENGINES` (``auto``: LiteRT when installed).

    Example:
        >>> runner = TFLiteRecognizer("BASE/NAME/1/tflite/dynamic.tflite")
        >>> runner.logprobs(np.zeros(16000, np.float32)).shape
        (50, 29)
    """

    def __init__(
        self,
        path,
        num_threads: int | None = None,
        engine: str = "xnnpack",
        min_samples: int | None = None,
        split: bool | None = None,
        encoder=None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"TFLite model not found: {self.path}")
        self.featurizer = _export_featurizer(self.path)
        self.min_samples = int(min_samples or self.featurizer.min_samples)
        threads = num_threads or os.cpu_count()
        front = self.path.parent / FEATURIZER_FILE
        encoder = Path(encoder) if encoder else self.path.parent / encoder_file(self.path.stem)
        if split is None:
            split = front.is_file() and encoder.is_file()
        self.split = bool(split)
        if self.split:
            self.front = lite.TFLiteModel(front, threads, engine)
            self.model = lite.TFLiteModel(encoder, threads, engine)
        else:
            self.front = None
            self.model = lite.TFLiteModel(self.path, threads, engine)
        self.engine = self.model.engine
        self.interpreter = self.model.interpreter
        # A features-in model of `qn optimize` returns logits: log-softmax them here.
        self._logits = self.split and self.model.output_name == "logits"

    def logprobs(self, waveform: np.ndarray, name: str = "audio") -> np.ndarray:
        """Log-probabilities ``[frames, vocabulary]`` of a mono float32 waveform; AudioError
        for audio that is empty, too short, not finite, or whose features are not."""
        waveform = np.asarray(waveform, dtype=np.float32).reshape(1, -1)
        cfg = self.featurizer
        check_waveform(waveform[0], self.min_samples, cfg.sample_rate, name=name)
        if self.front is None:
            logprobs = self.model(waveform)[0]
        else:
            features = self.front(waveform)
            logprobs = self.model(features)[0] if np.all(np.isfinite(features)) else features
        if not np.all(np.isfinite(logprobs)):
            raise AudioError(
                "non_finite_features",
                f"Features of {name} are not finite (audio far beyond full scale?); "
                "nothing to transcribe.",
            )
        return lite.log_softmax(logprobs) if self._logits else logprobs


def _export_featurizer(tflite_path: Path) -> FeaturizerConfig:
    """The front end of the export a ``.tflite`` sits in (``VERSION/tflite/x.tflite`` beside
    ``VERSION/assets.extra/qn_export.json``), else the default front end."""
    from serving.layout import read_export_metadata

    meta = read_export_metadata(tflite_path.parent.parent)
    return FeaturizerConfig.from_dict(meta["featurizer"]) if meta else FeaturizerConfig()
