"""One utterance from manifest entry to TFRecord: tokenize, decode and check, augmented
copies, featurize, serialize. The Beam feature job's DoFns and the trainer's manifest cache
run these same functions, so both write the same records and refuse the same inputs.

Elements along the way: :class:`~qn_keras.data.manifest.Utterance` -> :class:`Transcribed`
(normalized transcript and token ids) -> :class:`Decoded` (16 kHz mono waveform, and its
speed-perturbed and narrowband copies) -> :class:`Featurized` -> serialized record; at any step
a :class:`~qn_keras.data.manifest.Failure` instead, which names the utterance and the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qn_keras.audio import AudioError, check_waveform, decode_audio, resample
from qn_keras.data.manifest import Failure, Utterance
from qn_keras.data.schema import serialize_utterance
from qn_keras.data.text import TranscriptError, tokenize_transcript

FEATURIZE_ERROR = "featurize_error"


@dataclasses.dataclass(frozen=True)
class Transcribed:
    utt: Utterance
    text: str
    labels: tuple


class _Version:
    """An utterance or one of its augmented copies (speed-perturbed, band-limited)."""

    speed: float
    narrowband: int

    @property
    def is_source(self) -> bool:
        return self.speed == 1.0 and not self.narrowband


@dataclasses.dataclass(frozen=True)
class Decoded(_Version):
    utt_id: str
    utt: Utterance
    text: str
    labels: tuple
    waveform: np.ndarray
    speed: float = 1.0
    narrowband: int = 0  # the sample rate a narrowband copy was passed through; 0: full band

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[0])


@dataclasses.dataclass(frozen=True)
class Featurized(_Version):
    utt_id: str
    utt: Utterance
    text: str
    labels: tuple
    features: np.ndarray
    duration: float
    speed: float = 1.0
    narrowband: int = 0

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[0])


def tokenize_utterance(utt: Utterance, tokenizer, oov: str = "drop"):
    """(:class:`Transcribed` or a ``oov_transcript`` failure, characters dropped)."""
    try:
        text, ids, unknown = tokenize_transcript(tokenizer, utt.text, oov)
    except TranscriptError as e:
        return Failure.of(utt, e.reason, str(e)), 0
    return Transcribed(utt, text, tuple(ids)), sum(unknown.values()) if unknown else 0


def _local_audio(path: str):
    return path


def decode_utterance(
    item: Transcribed,
    sample_rate: int,
    min_samples: int,
    max_duration: float | None = None,
    open_audio=None,
) -> Decoded | Failure:
    """Transcribed -> :class:`Decoded` 16 kHz mono waveform (offset/duration applied), or a
    failure: ``missing_file``, ``unreadable_audio``, ``empty_audio``, ``non_finite``,
    ``too_short`` (fewer samples than two feature frames need), ``too_long``.

    ``open_audio(path)`` returns what soundfile decodes (a local path, or a remote file's
    bytes), or None for a missing file; by default the path itself."""
    utt = item.utt
    try:
        source = (open_audio or _local_audio)(utt.audio_filepath)
        if source is None:
            raise AudioError("missing_file", f"Audio file not found: {utt.audio_filepath}")
        waveform = decode_audio(
            source,
            target_rate=sample_rate,
            offset=utt.offset,
            duration=utt.read_duration,
            name=utt.audio_filepath,
        )
        check_waveform(waveform, min_samples, sample_rate, max_duration, utt.audio_filepath)
    except AudioError as e:
        return Failure.of(utt, e.reason, str(e))
    return Decoded(utt.utt_id, utt, item.text, item.labels, waveform)


def speed_suffix(rate: float) -> str:
    return f"_sp{rate:g}"


def perturb_speed(waveform: np.ndarray, rate: float, sample_rate: int) -> np.ndarray:
    """Plays ``waveform`` ``rate`` times as fast, changing tempo and pitch together (NeMo's
    ``SpeedPerturbation``, Kaldi's recipe): the audio is treated as sampled at
    ``rate * sample_rate`` and resampled back to ``sample_rate``."""
    return resample(waveform, int(round(sample_rate * rate)), sample_rate)


def speed_perturbed_copies(
    item: Decoded, rates: Sequence[float], sample_rate: int, min_samples: int
) -> list[Decoded | Failure]:
    """The item itself plus one copy per rate (ids suffixed ``_sp<rate>``); a copy too short to
    featurize is a ``too_short`` failure under its own id."""
    copies: list[Decoded | Failure] = [item]
    for rate in rates:
        if float(rate) == 1.0:
            continue
        utt_id = item.utt_id + speed_suffix(rate)
        waveform = perturb_speed(item.waveform, rate, sample_rate)
        if waveform.shape[0] < min_samples:
            message = (
                f"Speed {rate:g} copy has {waveform.shape[0]} samples, fewer than {min_samples}"
            )
            copies.append(Failure.of(item.utt, "too_short", message, utt_id=utt_id))
            continue
        copies.append(dataclasses.replace(item, utt_id=utt_id, waveform=waveform, speed=rate))
    return copies


def narrowband_suffix(rate: int) -> str:
    return f"_nb{rate:d}"


def band_limit(waveform: np.ndarray, via_rate: int, sample_rate: int) -> np.ndarray:
    """The waveform as a ``via_rate`` recording upsampled to ``sample_rate`` would sound:
    low-passed at 95% of ``via_rate / 2`` with a 513-tap Kaiser FIR (about -47 dB above the
    cut-off; the 41-tap filter of a resample_poly round trip leaked -30 dB), same length."""
    from scipy.signal import fftconvolve, firwin

    taps = firwin(513, 0.95 * via_rate / 2, fs=sample_rate, window=("kaiser", 10.0))
    return fftconvolve(waveform.astype(np.float64), taps, mode="same").astype(np.float32)


def narrowband_copies(items: list, rates: Sequence[int], sample_rate: int) -> list:
    """``items`` plus, for every decoded one (speed copies too), one copy band-limited through
    each rate in ``rates`` (ids suffixed ``_nb<rate>``): trains models that must also
    transcribe narrowband sources (telephone audio, 8 kHz corpora upsampled to 16 kHz), whose
    top mel bins hold nothing but normalized noise. Failure records pass through."""
    out = list(items)
    for item in items:
        if isinstance(item, Failure):
            continue
        for rate in rates:
            waveform = band_limit(item.waveform, int(rate), sample_rate)
            utt_id = item.utt_id + narrowband_suffix(int(rate))
            out.append(dataclasses.replace(item, utt_id=utt_id, waveform=waveform, narrowband=rate))
    return out


def featurize_decoded(featurizer, item: Decoded) -> Featurized | Failure:
    """Decoded -> :class:`Featurized`; any error is a ``featurize_error`` failure, features
    that come out NaN or infinite a ``non_finite_features`` one (never written)."""
    try:
        features = featurizer(item.waveform)
    except Exception as e:  # noqa: BLE001 - one bad utterance must not stop the job
        return Failure.of(item.utt, FEATURIZE_ERROR, f"{type(e).__name__}: {e}", item.utt_id)
    if not np.all(np.isfinite(features)):
        message = "features are not finite (NaN or infinite; audio far beyond full scale?)"
        return Failure.of(item.utt, "non_finite_features", message, item.utt_id)
    duration = item.num_samples / featurizer.config.sample_rate
    return Featurized(
        item.utt_id,
        item.utt,
        item.text,
        item.labels,
        features,
        duration,
        item.speed,
        item.narrowband,
    )


def to_tf_example(item: Featurized) -> bytes:
    return serialize_utterance(
        item.features, item.labels, item.text, item.duration, item.utt_id, item.utt.audio_filepath
    )


def utterance_records(
    utt: Utterance,
    tokenizer,
    featurizer,
    *,
    oov: str = "drop",
    max_duration: float | None = None,
    speed_perturb: Sequence[float] = (),
    narrowband: Sequence[int] = (),
    open_audio=None,
) -> list[Featurized | Failure]:
    """The whole chain for one utterance: its featurized versions (the source, then any
    augmented copies), or failures. ``featurizer`` is a
    :class:`~qn_keras.featurizer.CompiledFeaturizer`."""
    transcribed, _ = tokenize_utterance(utt, tokenizer, oov)
    if isinstance(transcribed, Failure):
        return [transcribed]
    config = featurizer.config
    decoded = decode_utterance(
        transcribed, config.sample_rate, config.min_samples, max_duration, open_audio
    )
    if isinstance(decoded, Failure):
        return [decoded]
    copies = speed_perturbed_copies(decoded, speed_perturb, config.sample_rate, config.min_samples)
    copies = narrowband_copies(copies, narrowband, config.sample_rate)
    return [c if isinstance(c, Failure) else featurize_decoded(featurizer, c) for c in copies]
