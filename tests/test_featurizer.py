"""The TensorFlow log-mel front end against the independent float64 reference (both eras)."""

from pathlib import Path

import numpy as np
import pytest
import reference_numpy as ref
import soundfile as sf
import tensorflow as tf

from qn_keras.featurizer import (
    FeaturizerConfig,
    LogMelSpectrogram,
    featurize,
    slaney_mel_filterbank,
)

ERAS = ("current", "legacy")
# Features are normalised to zero mean and unit variance per band, so an absolute tolerance is
# one relative to the features' own scale: 1e-4 of a standard deviation. float32 STFT rounding
# against the float64 reference measures ~4e-5; a wrong window, pre-emphasis, mel scale, log
# guard or variance estimator (n vs n-1: 1/n of scale) moves features by 1e-3 and more.
TOLERANCE = 1e-4
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"

# librosa 0.11.0 `filters.mel(sr=16000, n_fft=512, n_mels=64, fmin=0, fmax=8000, htk=False,
# norm="slaney")`: (row, first non-zero bin, the row's non-zero values).
LIBROSA_ROWS = [
    (0, 1, [0.0145112816, 0.0140755121]),
    (9, 14, [0.00921660662, 0.0193701871, 0.00485890452]),
    (31, 51, [0.0035888257, 0.00872585643, 0.011526946, 0.00662996946, 0.00173299306]),
    (
        63,
        233,
        [
            8.80921943e-05, 0.000328267604, 0.000568442978, 0.000808618381, 0.00104879378,
            0.00128896919, 0.00152914459, 0.00176931999, 0.00200949539, 0.00224967068,
            0.0024898462, 0.00273002149, 0.00251847156, 0.00228951965, 0.00206056773,
            0.00183161581, 0.00160266377, 0.00137371186, 0.00114475982, 0.000915807905,
            0.000686855929, 0.000457903952, 0.000228951976,
        ],
    ),
]  # fmt: skip


def _real_clips():
    """Three speech clips of different lengths from the project's own sample_data."""
    paths = sorted(SAMPLE_DATA.glob("**/*.flac"))
    clips = {}
    for path in paths:
        wave = sf.read(str(path), dtype="float32")[0]
        clips.setdefault(len(wave), wave)
        if len(clips) == 3:
            return list(clips.values())
    raise AssertionError("sample_data holds fewer than 3 clips of different lengths")


def _synthetic(length, seed):
    """Non-stationary, full-band test audio: amplitude-modulated noise plus a chirp."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 16000.0
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t + seed)
    chirp = np.sin(2 * np.pi * (200.0 + 3000.0 * t) * t)
    return (0.3 * envelope * rng.normal(size=length) + 0.2 * chirp).astype(np.float32)


def _batch(waves, pad_value):
    """Right-pads `waves` into one batch, filling the padding with `pad_value` (array or float)."""
    samples = max(len(w) for w in waves) + 237
    batch = np.empty((len(waves), samples), np.float32)
    batch[:] = pad_value
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    return batch, np.array([len(w) for w in waves], np.int32)


def _garbage(shape, seed=7):
    return np.random.default_rng(seed).uniform(-5, 5, size=shape).astype(np.float32)


def _compare(batch, lengths, era):
    features, feature_lengths = LogMelSpectrogram(era=era)(batch, lengths)
    features, feature_lengths = features.numpy(), feature_lengths.numpy()
    expected, expected_lengths = ref.nemo_features(batch, lengths, era)
    assert features.shape == expected.shape == (len(batch), 1 + batch.shape[1] // 160, 64)
    np.testing.assert_array_equal(feature_lengths, expected_lengths)
    for b, n in enumerate(feature_lengths):
        assert np.all(features[b, n:] == 0.0), "frames past the length must be exactly 0"
    return float(np.abs(features - expected).max()), features


def test_filterbank_matches_from_scratch_slaney_and_librosa():
    fb = slaney_mel_filterbank(16000, 512, 64)
    assert fb.shape == (64, 257)
    np.testing.assert_allclose(fb, ref.slaney_filterbank(), rtol=0, atol=1e-12)
    for row, first, values in LIBROSA_ROWS:
        nonzero = np.flatnonzero(fb[row])
        assert nonzero[0] == first and len(nonzero) == len(values)
        np.testing.assert_allclose(fb[row, nonzero], values, rtol=1e-6, atol=1e-10)
    # Slaney normalisation: unit area per triangle (in Hz); exact enough on the wide filters.
    bin_hz = 16000 / 512
    np.testing.assert_allclose(fb[40:].sum(axis=1) * bin_hz, 1.0, atol=0.02)


@pytest.mark.parametrize("era", ERAS)
def test_features_match_reference_on_real_speech(era):
    waves = _real_clips()
    batch, lengths = _batch(waves, 0.0)
    if era == "current":  # batch padding is ignored in this era, so fill it with garbage
        batch, lengths = _batch(waves, _garbage((3, max(map(len, waves)) + 237)))
    diff, _ = _compare(batch, lengths, era)
    assert diff <= TOLERANCE, f"max |tf - reference| = {diff:.2e}"


@pytest.mark.parametrize("era", ERAS)
def test_features_match_reference_on_synthetic_signals(era):
    waves = [_synthetic(n, seed) for seed, n in enumerate([16000, 12345, 4321, 800, 321])]
    batch, lengths = _batch(waves, 0.0 if era == "legacy" else 9.0)
    diff, _ = _compare(batch, lengths, era)
    assert diff <= TOLERANCE, f"max |tf - reference| = {diff:.2e}"


@pytest.mark.parametrize("era", ERAS)
def test_band_limited_audio_is_within_float32_conditioning(era):
    # Audio with no energy above 4 kHz (8 kHz voices upsampled, like speech-mini's flite/kal)
    # leaves the top mel bins at the log guard with a spread over time of 1e-3 or less, and
    # per-feature normalisation divides float32 FFT rounding in those bins by that spread (NeMo
    # computes in float32 too). Those bins are bounded in log-mel units instead.
    wave = _synthetic(24000, 3).astype(np.float64)
    spectrum = np.fft.rfft(wave)
    spectrum[len(spectrum) // 2 :] = 0.0
    wave = np.fft.irfft(spectrum, n=len(wave))
    fade = np.sin(np.linspace(0.0, np.pi / 2, 1600)) ** 2  # no broadband clicks at the ends
    wave[:1600] *= fade
    wave[-1600:] *= fade[::-1]
    batch = wave.astype(np.float32)[None]
    lengths = np.array([len(wave)], np.int32)
    features = LogMelSpectrogram(era=era)(batch, lengths)[0].numpy()[0]
    log_mel, seq_len = ref.nemo_log_mel(batch, lengths, era)
    expected = ref.per_feature_normalize(log_mel, seq_len)[0]
    n = int(seq_len[0])
    sigma = log_mel[0, :n].std(axis=0, ddof=1)
    error = np.abs(features[:n] - expected[:n])
    assert sigma.min() < 1e-2, "the test signal must leave some bins ill-conditioned"
    assert error[:, sigma >= 0.5].max() <= TOLERANCE  # normalised units
    assert (error * (sigma + ref.STD_EPS)).max() <= 5e-4  # log-mel units, every bin


@pytest.mark.parametrize("era", ERAS)
def test_frame_counts(era):
    config = FeaturizerConfig(era=era)
    layer = LogMelSpectrogram(era=era)
    lengths = [320, 321, 479, 480, 1600, 16000, 16159]
    batch, lens = _batch([_synthetic(n, 0) for n in lengths], 0.0)
    features, feature_lengths = layer(batch, lens)
    extra = 0 if era == "current" else 1
    expected = [n // 160 + extra for n in lengths]
    assert feature_lengths.numpy().tolist() == expected
    assert [config.num_frames(n) for n in lengths] == expected
    assert features.shape[1] == 1 + batch.shape[1] // 160
    # spec section 5.8: one second gives 100 (current) or 101 (legacy) frames
    assert config.num_frames(16000) == 100 + extra


def test_current_era_is_batch_invariant():
    layer = LogMelSpectrogram(era="current")
    waves = [_synthetic(n, seed) for seed, n in enumerate([9000, 16000, 4800])]
    batch, lengths = _batch(waves, _garbage((3, 16237)))
    in_batch = layer(batch, lengths)[0].numpy()
    worst = 0.0
    for b, wave in enumerate(waves):
        alone = layer(wave[None], [len(wave)])[0].numpy()[0]
        worst = max(worst, float(np.abs(in_batch[b, : len(alone)] - alone).max()))
    assert worst <= 1e-5, worst


def test_legacy_era_depends_on_batch_padding_as_nemo_does():
    # NeMo <= 2.4 reflect-pads the padded row and pre-emphasises into the padding, so an
    # utterance's features change when it is padded (spec 2.2: up to 0.68 in NeMo's test).
    layer = LogMelSpectrogram(era="legacy")
    wave = _synthetic(9000, 1)
    alone = layer(wave[None], [len(wave)])[0].numpy()[0]
    padded = np.concatenate([wave, np.zeros(7000, np.float32)])[None]
    in_batch = layer(padded, [len(wave)])[0].numpy()[0, : len(alone)]
    assert np.abs(in_batch - alone).max() > 1e-2
    expected_alone = ref.nemo_features(wave[None], [len(wave)], "legacy")[0][0]
    expected_padded = ref.nemo_features(padded, [len(wave)], "legacy")[0][0, : len(alone)]
    assert np.abs(alone - expected_alone).max() <= TOLERANCE
    assert np.abs(in_batch - expected_padded).max() <= TOLERANCE


def test_dither_only_in_training():
    layer = LogMelSpectrogram(era="current", dither=1e-5)
    batch, lengths = _batch([_synthetic(8000, 0), _synthetic(5000, 1)], 0.0)
    eval_a = layer(batch, lengths, training=False)[0].numpy()
    eval_b = layer(batch, lengths)[0].numpy()
    train = layer(batch, lengths, training=True)[0].numpy()
    np.testing.assert_array_equal(eval_a, eval_b)
    assert np.abs(train - eval_a).max() > 0.0
    assert np.abs(train - eval_a).max() < 0.1  # 1e-5 noise on speech-level audio
    assert np.all(train[1, 5000 // 160 :] == 0.0)
    no_dither = LogMelSpectrogram(era="current", dither=0.0)
    np.testing.assert_array_equal(no_dither(batch, lengths, training=True)[0].numpy(), eval_a)


@pytest.mark.parametrize("era, too_short, shortest", [("current", 319, 320), ("legacy", 256, 257)])
def test_featurize_rejects_empty_and_too_short_audio(era, too_short, shortest):
    config = FeaturizerConfig(era=era)
    assert config.min_samples == shortest
    with pytest.raises(ValueError, match="empty"):
        featurize(np.zeros(0, np.float32), config)
    with pytest.raises(ValueError, match=f"{too_short} samples, fewer than the {shortest}"):
        featurize(_synthetic(too_short, 0), config)
    with pytest.raises(ValueError, match="1-D"):
        featurize(np.zeros((2, 1000), np.float32), config)
    wave = _synthetic(shortest, 0)
    features = featurize(wave, config)
    assert features.shape == (config.num_frames(shortest), 64)
    expected = ref.nemo_features(wave[None], [shortest], era)[0][0]
    assert np.abs(features - expected[: len(features)]).max() <= TOLERANCE


def test_featurize_returns_valid_frames_of_one_utterance():
    wave = _synthetic(12345, 4)
    for era in ERAS:
        features = featurize(wave, FeaturizerConfig(era=era))
        expected, n = ref.nemo_features(wave[None], [len(wave)], era)
        assert features.shape == (n[0], 64)
        assert np.abs(features - expected[0, : n[0]]).max() <= TOLERANCE


def test_layer_config_round_trip_and_graph_mode():
    fb = np.asarray(ref.slaney_filterbank(), np.float32) * 1.5
    layer = LogMelSpectrogram(era="legacy", dither=0.0, filterbank=fb)
    clone = LogMelSpectrogram.from_config(layer.get_config())
    assert clone.config == layer.config
    batch, lengths = _batch([_synthetic(7000, 2), _synthetic(3000, 5)], 0.0)
    expected = layer(batch, lengths)[0].numpy()
    np.testing.assert_array_equal(clone(batch, lengths)[0].numpy(), expected)
    # the custom filterbank is the one used (a NeMo checkpoint's own `fb` buffer, say)
    with_fb = ref.nemo_features(batch, lengths, "legacy", filterbank=fb)[0]
    assert np.abs(expected - with_fb).max() <= TOLERANCE
    assert np.abs(expected - ref.nemo_features(batch, lengths, "legacy")[0]).max() > 1e-3

    @tf.function(input_signature=[tf.TensorSpec([None, None]), tf.TensorSpec([None], tf.int32)])
    def graph(waveform, lens):
        return layer(waveform, lens)

    np.testing.assert_allclose(graph(batch, lengths)[0].numpy(), expected, atol=1e-6)


def test_statistics_accumulated_in_blocks_normalize_like_the_featurizer():
    """Long audio is featurized piece by piece and normalized with statistics merged over the
    pieces (qn transcribe's long-audio path): equal to the layer's own normalization."""
    from qn_keras.featurizer import FeatureStatistics

    wave = np.concatenate(_real_clips())
    layer = LogMelSpectrogram(**FeaturizerConfig().to_dict())
    batch, lengths = tf.constant(wave[None]), tf.constant([len(wave)])
    log_mel, n = (t.numpy() for t in layer.log_mel(batch, lengths, training=False))
    expected = layer(batch, lengths, training=False)[0].numpy()[0, : n[0]]
    frames = log_mel[0, : n[0]]
    statistics = FeatureStatistics(frames.shape[1])
    for first in range(0, len(frames), 97):  # uneven blocks, the last one short
        statistics.add(frames[first : first + 97])
    assert statistics.count == len(frames)
    assert np.abs(statistics.normalize(frames) - expected).max() <= 1e-5  # of one std
