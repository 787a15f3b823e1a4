"""NeMo-exact log-mel front end, made of core TensorFlow ops only.

One implementation, used unchanged by the Beam pipeline, the trainer and the serving graph.
Core ops only (frame, rfft, matmul, log, reductions) so it runs inside stock TF Serving and
TFLite: no tensorflow-io, no tensorflow-addons.

It reproduces NeMo's `AudioToMelSpectrogramPreprocessor` (spec section 2) for both front-end eras:

- ``current`` (NeMo >= 2.5): ``L // 160`` frames, zero STFT centre padding, pre-emphasis
  zeroed past each utterance's length. An utterance's features do not depend on batch padding.
- ``legacy`` (NeMo <= 2.4, what the released QuartzNet checkpoints were trained with):
  ``L // 160 + 1`` frames, reflect centre padding, unmasked pre-emphasis.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from qn_keras.choices import ERAS
from qn_keras.errors import UserInputError

LOG_ZERO_GUARD = 2.0**-24
NORM_EPSILON = 1e-5
# How features are normalized per mel band: by the utterance's own statistics (NeMo's
# "per_feature"), or frame-causally for streaming models (see causal_normalize).
NORMALIZATIONS = ("per_feature", "adaptive", "fixed")


@dataclasses.dataclass(frozen=True)
class FeaturizerConfig:
    """Front-end settings; defaults are NeMo's QuartzNet preprocessor."""

    era: str = "current"
    sample_rate: int = 16000
    num_mels: int = 64
    window_size: float = 0.02
    window_stride: float = 0.01
    n_fft: int = 512
    preemph: float = 0.97
    lowfreq: float = 0.0
    highfreq: float | None = None
    dither: float = 1e-5
    # Streaming models: "adaptive"/"fixed" normalize with a prior (the average training
    # utterance's per-band mean and std, filled in by `qn train` when not given) weighted as
    # `prior_frames` frames (see causal_normalize).
    normalize: str = "per_feature"
    prior_mean: tuple | None = None
    prior_std: tuple | None = None
    prior_frames: float = 100.0

    def __post_init__(self):
        if self.era not in ERAS:
            raise UserInputError(f"Unknown front-end era {self.era!r}; expected one of {ERAS}.")
        if self.normalize not in NORMALIZATIONS:
            raise UserInputError(
                f"Unknown normalize {self.normalize!r}; expected one of {NORMALIZATIONS}."
            )
        for name in ("prior_mean", "prior_std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != self.num_mels:
                    raise UserInputError(f"{name} needs {self.num_mels} values (one per band).")
                object.__setattr__(self, name, value)
        if (self.prior_mean is None) != (self.prior_std is None):
            raise UserInputError("Give both prior_mean and prior_std, or neither.")
        if self.prior_std is not None and min(self.prior_std) <= 0:
            raise UserInputError("prior_std values must be positive.")
        if not self.prior_frames > 0:
            raise UserInputError(f"prior_frames must be > 0. Received: {self.prior_frames}")
        if self.win_length > self.n_fft:
            raise UserInputError(
                f"window_size*sample_rate ({self.win_length}) must not exceed n_fft ({self.n_fft})."
            )

    @property
    def win_length(self) -> int:
        return int(self.window_size * self.sample_rate)

    @property
    def hop_length(self) -> int:
        return int(self.window_stride * self.sample_rate)

    @property
    def min_samples(self) -> int:
        """Fewest samples that give two feature frames (per-feature std needs two); the legacy
        era's reflect centre padding (n_fft // 2 each side) also needs more samples than that."""
        if self.era == "current":
            return 2 * self.hop_length
        return max(self.hop_length, self.n_fft // 2 + 1)

    def num_frames(self, num_samples):
        """Feature frames for `num_samples` samples (int or integer tensor)."""
        frames = num_samples // self.hop_length
        return frames if self.era == "current" else frames + 1

    @property
    def causal(self) -> bool:
        """Normalized frame by frame (a streaming model's front end)."""
        return self.normalize != "per_feature"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("prior_mean", "prior_std"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, config: dict) -> FeaturizerConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields})


def _hz_to_mel_slaney(freqs: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale: linear below 1 kHz, logarithmic above.
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    freqs = np.asarray(freqs, dtype=np.float64)
    mels = freqs / f_sp
    above = freqs >= min_log_hz
    mels[above] = min_log_mel + np.log(freqs[above] / min_log_hz) / logstep
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    mels = np.asarray(mels, dtype=np.float64)
    freqs = f_sp * mels
    above = mels >= min_log_mel
    freqs[above] = min_log_hz * np.exp(logstep * (mels[above] - min_log_mel))
    return freqs


def slaney_mel_filterbank(
    sample_rate: int, n_fft: int, num_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Slaney-normalised mel filterbank, shape (num_mels, n_fft // 2 + 1), float64.

    The filters NeMo builds with ``librosa.filters.mel(..., htk=False, norm='slaney')``.
    ``tf.signal.linear_to_mel_weight_matrix`` is not a substitute: HTK scale, no area norm.
    """
    fmax = sample_rate / 2.0 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_points = _mel_to_hz_slaney(
        np.linspace(
            _hz_to_mel_slaney(np.array([fmin]))[0],
            _hz_to_mel_slaney(np.array([fmax]))[0],
            num_mels + 2,
        )
    )
    fdiff = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2 : num_mels + 2] - mel_points[:num_mels]))[:, None]
    return weights


def causal_normalize(log_mel, valid, mean0, var0, prior_frames, sums=None):
    """Frame-causal per-band normalization: frame ``t`` is normalized by the prior (mean
    ``mean0``, variance ``var0``, counted as ``prior_frames`` frames) pooled with the valid
    frames up to and including ``t``; ``prior_frames`` None: by the prior alone ("fixed").

    ``log_mel`` ``[batch, frames, mels]``, ``valid`` 0/1 ``[batch, frames, 1]``; ``sums``
    ``[batch, 3, mels]`` carries (sum of x - mean0, sum of its square, count) from earlier
    frames (the stream step's state; zeros at the start). Returns the normalized frames
    (zero where not valid) and the new sums. The one implementation both the offline front
    end and the stream step use, so streaming equals offline however the audio is chunked.
    """
    std0 = tf.sqrt(var0)
    if prior_frames is None:
        return (log_mel - mean0) / (std0 + NORM_EPSILON) * valid, sums
    d = (log_mel - mean0) * valid
    if sums is None:
        sums = tf.zeros_like(d[:, :3])
    cum_d = sums[:, :1] + tf.cumsum(d, axis=1)
    cum_d2 = sums[:, 1:2] + tf.cumsum(d * d, axis=1)
    count = sums[:, 2:3] + tf.cumsum(tf.broadcast_to(valid, tf.shape(d)), axis=1)
    new_sums = tf.concat([cum_d[:, -1:], cum_d2[:, -1:], count[:, -1:]], axis=1)
    n = prior_frames + count
    shift = cum_d / n
    second = (prior_frames * var0 + cum_d2) / n
    std = tf.sqrt(tf.maximum(second - tf.square(shift), 0.0))
    return (log_mel - mean0 - shift) / (std + NORM_EPSILON) * valid, new_sums


def symmetric_hann(length: int) -> np.ndarray:
    """``torch.hann_window(length, periodic=False)``: 0.5 - 0.5 cos(2 pi n / (length - 1))."""
    n = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (length - 1))


def sequence_mask(lengths: tf.Tensor, maxlen: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    return tf.sequence_mask(lengths, maxlen=maxlen, dtype=dtype)


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class LogMelSpectrogram(tf.keras.layers.Layer):
    """Waveforms and lengths to NeMo's normalised log-mel features and feature lengths.

    Shapes: ``waveform`` float32 ``[batch, samples]`` (right-padded with anything; samples past
    each length are ignored in the ``current`` era), ``lengths`` int ``[batch]`` in samples.
    Returns ``features`` float32 ``[batch, frames, num_mels]`` with frames past each utterance's
    length set to 0, and ``feature_lengths`` int32 ``[batch]``.

    Args:
        era: ``"current"`` or ``"legacy"`` (see module docstring).
        sample_rate, num_mels, window_size, window_stride, n_fft, preemph, lowfreq, highfreq,
        dither: NeMo preprocessor settings; defaults are QuartzNet's.
        normalize, prior_mean, prior_std, prior_frames: ``per_feature`` (NeMo's, default) or a
            streaming model's frame-causal ``adaptive``/``fixed`` normalization with its
            prior (:func:`causal_normalize`).
        filterbank: optional ``(num_mels, n_fft//2+1)`` array replacing the computed slaney
            filterbank (a NeMo checkpoint's own ``fb`` buffer, say).
        window: optional ``(win_length,)`` array replacing the symmetric Hann window.

    Example:
        >>> layer = LogMelSpectrogram(era="current")
        >>> feats, lens = layer(tf.zeros([2, 16000]) + 0.1, tf.constant([16000, 8000]))
        >>> feats.shape, lens.numpy().tolist()
        (TensorShape([2, 100, 64]), [100, 50])

    Reference: NeMo ``FilterbankFeatures``; QuartzNet, arXiv:1910.10261.
    """

    def __init__(
        self,
        era="current",
        sample_rate=16000,
        num_mels=64,
        window_size=0.02,
        window_stride=0.01,
        n_fft=512,
        preemph=0.97,
        lowfreq=0.0,
        highfreq=None,
        dither=1e-5,
        filterbank=None,
        window=None,
        normalize="per_feature",
        prior_mean=None,
        prior_std=None,
        prior_frames=100.0,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.config = FeaturizerConfig(
            era=era,
            sample_rate=sample_rate,
            num_mels=num_mels,
            window_size=window_size,
            window_stride=window_stride,
            n_fft=n_fft,
            preemph=preemph,
            lowfreq=lowfreq,
            highfreq=highfreq,
            dither=dither,
            normalize=normalize,
            prior_mean=prior_mean,
            prior_std=prior_std,
            prior_frames=prior_frames,
        )
        cfg = self.config
        if cfg.causal and cfg.prior_mean is None:
            raise UserInputError(
                f"normalize={cfg.normalize!r} needs prior_mean and prior_std (qn train "
                "estimates them from the training audio)."
            )
        if filterbank is None:
            filterbank = slaney_mel_filterbank(sample_rate, n_fft, num_mels, lowfreq, highfreq)
        filterbank = np.asarray(filterbank, dtype=np.float32).reshape(num_mels, n_fft // 2 + 1)
        if window is None:
            window = symmetric_hann(cfg.win_length)
        window = np.asarray(window, dtype=np.float32).reshape(cfg.win_length)
        self._filterbank_init = filterbank
        self._window_init = window
        # torch.stft centre-pads a shorter window with zeros to n_fft.
        left = (n_fft - cfg.win_length) // 2
        padded_window = np.zeros(n_fft, dtype=np.float32)
        padded_window[left : left + cfg.win_length] = window
        self._fft_window = tf.constant(padded_window)
        self._mel_matrix = tf.constant(filterbank.T)  # [bins, mels]

    def log_mel(self, waveform, lengths, training=None):
        """Un-normalised log-mel ``[batch, frames, num_mels]`` and feature lengths.

        Long-audio transcription featurizes a file in pieces with this and normalises with the
        whole file's statistics, which ``call`` would otherwise compute per piece.
        """
        cfg = self.config
        waveform = tf.convert_to_tensor(waveform, tf.float32)
        lengths = tf.cast(lengths, tf.int32)
        num_samples = tf.shape(waveform)[1]
        sample_mask = sequence_mask(lengths, num_samples)
        if training and cfg.dither > 0:
            waveform = waveform + cfg.dither * tf.random.normal(tf.shape(waveform))
        if cfg.preemph:
            waveform = tf.concat(
                [waveform[:, :1], waveform[:, 1:] - cfg.preemph * waveform[:, :-1]], axis=1
            )
            if cfg.era == "current":
                waveform = waveform * sample_mask
        half = cfg.n_fft // 2
        pad_mode = "CONSTANT" if cfg.era == "current" else "REFLECT"
        padded = tf.pad(waveform, [[0, 0], [half, half]], mode=pad_mode)
        frames = tf.signal.frame(padded, cfg.n_fft, cfg.hop_length)  # [B, 1 + S//hop, n_fft]
        log_mel = self.frames_to_log_mel(frames)
        feature_lengths = tf.minimum(cfg.num_frames(lengths), tf.shape(log_mel)[1])
        return log_mel, feature_lengths

    def prior_tensors(self):
        """``(mean0, var0, prior_frames)`` of a causal front end (see causal_normalize)."""
        cfg = self.config
        frames = None if cfg.normalize == "fixed" else float(cfg.prior_frames)
        var0 = np.asarray(cfg.prior_std, np.float32) ** 2
        return tf.constant(np.asarray(cfg.prior_mean, np.float32)), tf.constant(var0), frames

    def frames_to_log_mel(self, frames):
        """``[batch, frames, n_fft]`` windows of the pre-emphasized waveform to un-normalised
        log-mel ``[batch, frames, num_mels]`` (the streaming front end frames its own)."""
        power = self._power_spectrum(frames)
        mel = self._mel_projection(power)  # [B, T, mels]
        return tf.math.log(mel + LOG_ZERO_GUARD)

    def _power_spectrum(self, frames):
        # A hook: the TFLite front end computes the same DFT as one matmul.
        spectrum = tf.signal.rfft(frames * self._fft_window, fft_length=[self.config.n_fft])
        return tf.math.square(tf.math.real(spectrum)) + tf.math.square(tf.math.imag(spectrum))

    def _mel_projection(self, power):
        # A hook: TFLite export overrides it to keep the filterbank out of int8 quantization.
        return tf.linalg.matmul(power, self._mel_matrix)

    def call(self, waveform, lengths, training=None):
        log_mel, feature_lengths = self.log_mel(waveform, lengths, training=training)
        num_frames = tf.shape(log_mel)[1]
        frame_mask = sequence_mask(feature_lengths, num_frames)[:, :, None]
        if self.config.causal:
            mean0, var0, prior_frames = self.prior_tensors()
            features, _ = causal_normalize(log_mel, frame_mask, mean0, var0, prior_frames)
            return features, feature_lengths
        count = tf.cast(feature_lengths, tf.float32)[:, None, None]
        mean = tf.reduce_sum(log_mel * frame_mask, axis=1, keepdims=True) / tf.maximum(count, 1.0)
        centered = (log_mel - mean) * frame_mask
        # Unbiased (ddof=1) std, epsilon added to the std, as NeMo's per_feature normalisation.
        variance = tf.reduce_sum(tf.square(centered), axis=1, keepdims=True) / tf.maximum(
            count - 1.0, 1.0
        )
        features = centered / (tf.sqrt(variance) + NORM_EPSILON)
        return features * frame_mask, feature_lengths

    def get_config(self):
        config = super().get_config()
        config.update(self.config.to_dict())
        config["filterbank"] = self._filterbank_init.tolist()
        config["window"] = self._window_init.tolist()
        return config


class FeatureStatistics:
    """Per-band mean and standard deviation accumulated over blocks of un-normalized log-mel
    frames, and the featurizer's per-feature normalization with them, for audio featurized
    piece by piece (long files). Blocks are merged with Chan et al.'s parallel update in
    float64; normalizing the whole utterance this way equals :class:`LogMelSpectrogram`'s own
    normalization (unbiased std, epsilon added to the std), to float32 rounding."""

    def __init__(self, num_mels: int):
        self.count = 0
        self.mean = np.zeros(num_mels)
        self._m2 = np.zeros(num_mels)

    def add(self, frames: np.ndarray) -> None:
        """Adds ``[frames, num_mels]`` log-mel frames (before normalization)."""
        n = len(frames)
        if n == 0:
            return
        block_mean = frames.mean(axis=0, dtype=np.float64)
        block_m2 = ((frames - block_mean) ** 2).sum(axis=0, dtype=np.float64)
        delta = block_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        self._m2 = self._m2 + block_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self._m2 / max(self.count - 1, 1))

    def normalize(self, frames: np.ndarray) -> np.ndarray:
        mean, std = self.mean.astype(np.float32), self.std.astype(np.float32)
        return (frames - mean) / (std + NORM_EPSILON)


def featurize(waveform: np.ndarray, config: FeaturizerConfig | None = None) -> np.ndarray:
    """Features ``[frames, num_mels]`` of one mono waveform; raises ValueError if too short.

    Runs a :class:`CompiledFeaturizer` cached per config (one graph call, not ~30 eager ops)."""
    config = config or FeaturizerConfig()
    if config not in _COMPILED:
        _COMPILED[config] = CompiledFeaturizer(config)
    return _COMPILED[config](waveform)


class CompiledFeaturizer:
    """``featurizer(waveform_1d)`` -> ``[frames, num_mels]`` float32: the one
    :class:`LogMelSpectrogram`, traced once with a dynamic-length signature so each call is one
    graph run instead of ~30 eager ops (measured 7 ms instead of 39 ms for 3 s of audio on 2 CPU
    cores). Used per utterance by :func:`featurize`, the Beam pipeline and the benchmarks.

    Example:
        >>> featurizer = CompiledFeaturizer(FeaturizerConfig(era="current"))
        >>> featurizer(np.full(16000, 0.1, np.float32)).shape
        (100, 64)
    """

    def __init__(self, config: FeaturizerConfig | None = None):
        self.config = config or FeaturizerConfig()
        self.layer = LogMelSpectrogram(**self.config.to_dict())
        # Calling the concrete function skips tf.function's per-call signature matching, which
        # costs about as much as featurizing a short utterance.
        self._function = tf.function(self._featurize).get_concrete_function(
            tf.TensorSpec([None], tf.float32)
        )

    def _featurize(self, waveform):
        length = tf.shape(waveform)[:1]
        features, lengths = self.layer(waveform[None, :], length, training=False)
        return features[0, : lengths[0]]

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        waveform = np.asarray(waveform, dtype=np.float32)
        if waveform.ndim != 1:
            raise UserInputError(f"Expected a 1-D mono waveform; received shape {waveform.shape}.")
        check_audio_length(len(waveform), self.config)
        return self._function(tf.constant(waveform)).numpy()


def check_audio_length(num_samples: int, config: FeaturizerConfig) -> None:
    if num_samples == 0:
        raise UserInputError("Audio is empty (0 samples).")
    if num_samples < config.min_samples:
        raise UserInputError(
            f"Audio has {num_samples} samples, fewer than the {config.min_samples} "
            f"({config.min_samples / config.sample_rate * 1000:.0f} ms) needed for two feature "
            f"frames in the {config.era!r} front end"
            + (" and for its reflect padding." if config.era == "legacy" else ".")
        )


_COMPILED: dict = {}
