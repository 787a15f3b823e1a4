"""Audio decoding (formats, PCM scaling, channel mixing, resampling) and its error reasons."""

import io

import numpy as np
import pytest
import soundfile as sf

from qn_keras.audio import REASONS, AudioError, check_waveform, decode_audio


def _encode(data, rate, fmt, subtype=None):
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _tone(freq, rate, seconds, amplitude=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def _dominant_hz(wave, rate):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.argmax(spectrum) * rate / len(wave)


def test_integer_pcm_is_scaled_like_nemo(tmp_path):
    pcm = np.array([0, 16384, -32768, 32767, -1], np.int16)
    path = tmp_path / "pcm16.wav"
    sf.write(path, pcm, 16000, subtype="PCM_16")
    wave = decode_audio(path)
    assert wave.dtype == np.float32
    np.testing.assert_array_equal(wave, pcm / 32768.0)  # 1 / 2^(bits - 1)
    pcm24 = _encode(np.array([0.5, -0.25]), 16000, "WAV", "PCM_24")
    np.testing.assert_allclose(decode_audio(pcm24), [0.5, -0.25], atol=2**-23)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
def test_compressed_formats_decode_to_the_same_tone(fmt):
    tone = _tone(440.0, 16000, 0.5)
    wave = decode_audio(_encode(tone, 16000, fmt))
    assert abs(len(wave) - len(tone)) <= 1200  # codec priming / padding for MP3 and OGG
    assert abs(_dominant_hz(wave, 16000) - 440.0) < 5.0
    if fmt == "FLAC":  # lossless at 16 bits
        np.testing.assert_allclose(wave, tone, atol=2**-15)


def test_channels_are_averaged():
    left, right = _tone(300.0, 16000, 0.1), _tone(700.0, 16000, 0.1, 0.25)
    stereo = np.stack([left, right], axis=1)
    wave = decode_audio(_encode(stereo, 16000, "WAV", "FLOAT"))
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_duration_and_pitch(rate):
    tone = _tone(1000.0, rate, 0.5)
    wave = decode_audio(_encode(tone, rate, "WAV", "FLOAT"), target_rate=16000)
    assert len(wave) == 8000
    assert abs(_dominant_hz(wave, 16000) - 1000.0) < 3.0
    middle = wave[2000:6000]  # away from the filter's edge transients
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_offset_and_duration_slice_before_resampling():
    ramp = np.linspace(-1.0, 1.0, 16000)
    wave = decode_audio(_encode(ramp, 16000, "WAV", "FLOAT"), offset=0.25, duration=0.5)
    np.testing.assert_allclose(wave, ramp[4000:12000], atol=1e-7)


def test_decode_errors_name_their_reason(tmp_path):
    cases = {
        "missing_file": lambda: decode_audio(tmp_path / "nope.wav"),
        "unreadable_audio": lambda: decode_audio(b"definitely not audio"),
        "empty_audio": lambda: decode_audio(_encode(np.zeros(0), 16000, "WAV", "FLOAT")),
        "non_finite": lambda: decode_audio(
            _encode(np.array([0.1, np.nan, 0.2]), 16000, "WAV", "FLOAT")
        ),
    }
    for reason, call in cases.items():
        with pytest.raises(AudioError) as info:
            call()
        assert info.value.reason == reason and reason in REASONS
        assert isinstance(info.value, ValueError) and str(info.value)


def test_check_waveform_limits():
    check_waveform(np.zeros(320, np.float32), min_samples=320, max_duration=1.0)
    for wave, reason in [
        (np.zeros(0, np.float32), "empty_audio"),
        (np.zeros(319, np.float32), "too_short"),
        (np.zeros(16001, np.float32), "too_long"),
    ]:
        with pytest.raises(AudioError) as info:
            check_waveform(wave, min_samples=320, max_duration=1.0, name="clip.wav")
        assert info.value.reason == reason and "clip.wav" in str(info.value)
