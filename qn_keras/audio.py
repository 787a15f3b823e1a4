"""Audio reading: any soundfile format (WAV of any PCM width or float, FLAC, OGG, MP3), mixed
down to mono, resampled to the model's rate with a polyphase anti-aliasing filter.

Every failure raises :class:`AudioError` with a short machine-readable ``reason`` so callers
(the Beam pipeline's ``failures.jsonl``, the CLI) can report it.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from qn_keras.errors import UserInputError

# File name endings the commands take as audio when they search folders.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")

REASONS = (
    "missing_file",
    "unreadable_audio",
    "empty_audio",
    "too_short",
    "too_long",
    "non_finite",
    # Finite samples whose log-mel features are not (float audio far beyond full scale).
    "non_finite_features",
)


class AudioError(UserInputError):
    """Audio that cannot be used, with a ``reason`` from :data:`REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited polyphase resampling (Kaiser-windowed FIR, scipy's resample_poly)."""
    if orig_rate == target_rate:
        return waveform.astype(np.float32, copy=False)
    ratio = Fraction(int(target_rate), int(orig_rate))
    out = resample_poly(waveform.astype(np.float64), ratio.numerator, ratio.denominator)
    return out.astype(np.float32)


def decode_audio(
    source,
    target_rate: int = 16000,
    offset: float = 0.0,
    duration: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Reads a path, or encoded bytes, to a float32 mono waveform at ``target_rate``.

    Integer PCM is scaled by 1/2^(bits-1) as NeMo does (soundfile, dtype float32); channels are
    averaged. ``offset`` and ``duration`` (seconds) slice the audio before resampling.
    """
    name = name or (str(source) if not isinstance(source, bytes | bytearray) else "<bytes>")
    if isinstance(source, str | Path):
        if not Path(source).is_file():
            raise AudioError("missing_file", f"Audio file not found: {name}")
        handle = str(source)
    else:
        handle = io.BytesIO(bytes(source))
    try:
        with sf.SoundFile(handle) as f:
            rate = f.samplerate
            start = int(round(max(offset, 0.0) * rate))
            if start:
                f.seek(min(start, f.frames))
            frames = -1 if duration is None else int(round(duration * rate))
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError("unreadable_audio", f"Cannot decode audio {name}: {e}") from e
    waveform = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if waveform.size == 0:
        raise AudioError("empty_audio", f"Audio is empty (0 samples): {name}")
    if not np.all(np.isfinite(waveform)):
        raise AudioError("non_finite", f"Audio contains NaN or infinite samples: {name}")
    return resample(waveform, rate, target_rate)


def check_waveform(
    waveform: np.ndarray,
    min_samples: int,
    sample_rate: int = 16000,
    max_duration: float | None = None,
    name: str = "audio",
) -> None:
    """Raises AudioError if the waveform is empty, too short for two frames, too long, or
    holds NaN or infinite samples."""
    if waveform.size == 0:
        raise AudioError("empty_audio", f"Audio is empty (0 samples): {name}")
    if not np.all(np.isfinite(waveform)):
        raise AudioError("non_finite", f"Audio contains NaN or infinite samples: {name}")
    if waveform.size < min_samples:
        raise AudioError(
            "too_short",
            f"Audio has {waveform.size} samples ({waveform.size / sample_rate * 1000:.1f} ms), "
            f"fewer than the {min_samples} needed for two feature frames: {name}",
        )
    if max_duration is not None and waveform.size > math.ceil(max_duration * sample_rate):
        raise AudioError(
            "too_long",
            f"Audio lasts {waveform.size / sample_rate:.2f} s, more than the configured maximum "
            f"{max_duration} s: {name}",
        )


def pad_batch(waveforms) -> tuple[np.ndarray, np.ndarray]:
    """Waveforms of any lengths as one zero-padded float32 ``[batch, samples]`` array and their
    int32 lengths (what ``serving_default`` takes; the padding never changes the outputs)."""
    lengths = np.array([len(w) for w in waveforms], dtype=np.int32)
    batch = np.zeros((len(lengths), int(lengths.max(initial=0))), dtype=np.float32)
    for row, waveform in zip(batch, waveforms, strict=True):
        row[: len(waveform)] = waveform
    return batch, lengths


class ResampledReader:
    """Random access to a file's mono audio at the target rate, read from disk in pieces, for
    audio too long to hold in memory (``offset``/``duration`` in seconds select a segment).

    Piece boundaries land on the polyphase grid with a margin wider than the resampling
    filter, so every piece equals the same samples of :func:`decode_audio` on the whole file.
    """

    def __init__(self, path, target_rate: int, offset: float = 0.0, duration: float | None = None):
        self.file = sf.SoundFile(str(path))
        self.rate = self.file.samplerate
        self.start = min(int(round(max(offset, 0.0) * self.rate)), self.file.frames)
        end = self.file.frames
        if duration is not None:
            end = min(end, self.start + int(round(duration * self.rate)))
        self.native_length = end - self.start
        ratio = Fraction(int(target_rate), int(self.rate))
        self.up, self.down = ratio.numerator, ratio.denominator
        self.length = -(-self.native_length * self.up // self.down)
        reach = -(-10 * max(self.up, self.down) // self.up) + 1
        self.margin = reach + 1

    def close(self) -> None:
        self.file.close()

    def _native(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(stop - start, dtype=np.float32)
        lo, hi = max(start, 0), min(stop, self.native_length)
        if hi > lo:
            self.file.seek(self.start + lo)
            data = self.file.read(hi - lo, dtype="float32", always_2d=True)
            mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            out[lo - start : lo - start + len(mono)] = mono
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Target-rate samples ``[start, stop)``, clipped to the file."""
        start, stop = max(start, 0), min(stop, self.length)
        if self.up == self.down:
            return self._native(start, stop)
        # A native start on the down-grid maps to an integer output index.
        q = (start * self.down - self.margin * self.up) // (self.up * self.down)
        native_start = q * self.down
        native_stop = -(-stop * self.down // self.up) + self.margin
        piece = self._native(native_start, native_stop).astype(np.float64)
        out = resample_poly(piece, self.up, self.down)
        first = start - q * self.up
        return out[first : first + stop - start].astype(np.float32)
