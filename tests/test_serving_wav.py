"""In-graph WAV decoding and resampling (serving/wav.py) against soundfile + scipy, the
reference decode_audio uses. Tolerance: the decoded samples are bit-identical to soundfile's;
resampling matches scipy.signal.resample_poly to within 2e-7 (float32 accumulation of the same
float64 filter)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import serving_utils as su
import tensorflow as tf
from scipy.signal import resample_poly

from qn_keras.audio import decode_audio
from serving.wav import decode_wav_batch, resample

_decode = tf.function(
    lambda contents: decode_wav_batch(contents, 16000),
    input_signature=[tf.TensorSpec([None], tf.string)],
)


def _noise(seconds, rate, channels, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(0.3 * rng.standard_normal((int(seconds * rate), channels)), -1, 1)


def test_every_encoding_rate_and_channel_count_in_one_batch():
    cases = [
        (subtype, rate, channels)
        for subtype in ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE")
        for rate, channels in ((8000, 1), (16000, 2), (44100, 2))
    ]
    files = [
        su.wav_file_bytes(_noise(0.2 + 0.01 * i, rate, channels, seed=i), rate, subtype)
        for i, (subtype, rate, channels) in enumerate(cases)
    ]
    waveforms, lengths = _decode(tf.constant(files))
    for i, contents in enumerate(files):
        expected = decode_audio(contents)
        assert int(lengths[i]) == len(expected), cases[i]
        np.testing.assert_allclose(waveforms[i, : len(expected)], expected, atol=2e-7)
        assert not np.any(waveforms[i, len(expected) :])  # zero padding past each length


def test_extensible_format_and_extra_chunks():
    import io

    import soundfile as sf

    audio = _noise(0.1, 16000, 2)
    buffer = io.BytesIO()
    # WAVEX writes WAVE_FORMAT_EXTENSIBLE; LIST chunks before 'data' must be skipped.
    with sf.SoundFile(buffer, "w", 16000, 2, "PCM_24", format="WAVEX") as f:
        f.title = "a title that makes a LIST chunk"
        f.write(audio)
    contents = buffer.getvalue()
    assert contents[20:22] == b"\xfe\xff"  # format tag 0xFFFE
    waveforms, lengths = _decode(tf.constant([contents]))
    np.testing.assert_allclose(waveforms[0, : lengths[0]], decode_audio(contents), atol=2e-7)


@pytest.mark.parametrize("rate, length", [(7919, 3000), (22050, 2205), (48000, 4801), (96000, 50)])
def test_resampler_matches_scipy(rate, length):
    x = _noise(length / rate, rate, 1)[:, 0].astype(np.float32)
    ratio = Fraction(16000, rate)
    expected = resample_poly(x.astype(np.float64), ratio.numerator, ratio.denominator)
    got = resample(tf.constant(x), tf.constant(rate), 16000).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-7)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda good: b"", "wav_bytes[1]: audio is not a WAV file"),
        (lambda good: good[:30], "no data chunk"),
        (lambda good: good[:44], "no audio samples"),
        (lambda good: su.wav_file_bytes(_noise(0.1, 16000, 1), 16000, "ULAW"), "unsupported"),
        (lambda good: su.wav_file_bytes(_noise(0.1, 500, 1), 500, "PCM_16"), "sample rate"),
        (
            lambda good: su.wav_file_bytes(np.full((100, 1), np.nan), 16000, "FLOAT"),
            "NaN or infinite",
        ),
    ],
)
def test_bad_files_name_the_problem_and_the_item(make, message):
    good = su.wav_file_bytes(_noise(0.1, 16000, 1), 16000, "PCM_16")
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        _decode(tf.constant([good, make(good)]))
    assert message in error.value.message
    assert "wav_bytes[1]" in error.value.message
