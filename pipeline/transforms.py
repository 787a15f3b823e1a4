"""The feature job's stages: small DoFns and composites, each testable on in-memory input.

Elements flowing through the job:

- :class:`qn_keras.data.Utterance` from the manifest readers;
- :class:`Transcribed`: an utterance with its normalized transcript and token ids;
- :class:`Decoded`: plus its 16 kHz mono waveform (and speed-perturbed copies of it);
- :class:`Featurized`: features and everything the TFRecord holds;
- failure dicts ``{"source", "utt_id", "audio_filepath", "reason", "message"}`` on each
  DoFn's ``failed`` output, written to ``failures.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from qn_keras.data.manifest import ManifestFailure, Utterance, manifest_kind, parse_lines

FAILED = "failed"
NAMESPACE = "qn_features"
FEATURIZE_ERROR = "featurize_error"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Transcribed:
    utt: Utterance
    text: str
    labels: tuple


@dataclasses.dataclass(frozen=True)
class Decoded:
    utt_id: str
    utt: Utterance
    text: str
    labels: tuple
    waveform: np.ndarray
    speed: float = 1.0
    narrowband: int = 0  # the sample rate a narrowband copy was passed through; 0: full band

    @property
    def is_source(self) -> bool:
        return self.speed == 1.0 and not self.narrowband

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[0])


@dataclasses.dataclass(frozen=True)
class Featurized:
    utt_id: str
    utt: Utterance
    text: str
    labels: tuple
    features: np.ndarray
    duration: float
    speed: float = 1.0
    narrowband: int = 0

    @property
    def is_source(self) -> bool:
        return self.speed == 1.0 and not self.narrowband

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[0])


def failure(
    utt: Utterance | None, reason: str, message: str, utt_id: str | None = None, source=None
) -> dict:
    """A ``failures.jsonl`` record."""
    return {
        "source": source if source is not None else (utt.source if utt else None),
        "utt_id": utt_id if utt_id is not None else (utt.utt_id if utt else None),
        "audio_filepath": utt.audio_filepath if utt else None,
        "reason": reason,
        "message": message,
    }


def _failure_counter(reason: str):
    return Metrics.counter(NAMESPACE, f"failed_{reason}")


def _open_text(path: str) -> Iterator[str]:
    with FileSystems.open(path) as f:
        for raw in f:
            yield raw.decode("utf-8").rstrip("\r\n")


def expand_manifest_path(path: str) -> list[str]:
    """A manifest file stays as it is; a LibriSpeech-style folder becomes its
    ``*.trans.txt`` files (found through Beam's file systems, so ``gs://`` folders work)."""
    if "://" not in path and not os.path.isdir(path):
        return [path]
    if "://" in path and not path.endswith("/"):
        return [path]
    pattern = os.path.join(path.rstrip("/"), "**.trans.txt")
    found = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in found)


class ParseManifestFn(beam.DoFn):
    """Manifest path -> :class:`Utterance` per good line; a failure per bad line."""

    def __init__(self):
        self.utterances = Metrics.counter(NAMESPACE, "utterances_read")
        self.bad_lines = _failure_counter("bad_manifest_line")

    def process(self, path: str):
        kind = "librispeech" if path.endswith(".trans.txt") else manifest_kind(path)
        try:
            lines = list(_open_text(path))
        except (OSError, UnicodeDecodeError) as e:
            self.bad_lines.inc()
            yield beam.pvalue.TaggedOutput(
                FAILED,
                failure(None, "bad_manifest_line", f"Cannot read manifest: {e}", source=path),
            )
            return
        for item in parse_lines(lines, path, kind):
            if isinstance(item, ManifestFailure):
                self.bad_lines.inc()
                yield beam.pvalue.TaggedOutput(FAILED, {**item.to_dict(), "audio_filepath": None})
            else:
                self.utterances.inc()
                yield item


class ReadManifests(beam.PTransform):
    """Manifest paths -> utterances (main output) and bad lines (``failed``), spread over
    workers: each manifest is parsed by one worker, then reshuffled so that decoding and
    featurizing, the costly part, run in parallel."""

    def __init__(self, manifest_paths: Sequence[str]):
        super().__init__()
        self.manifest_paths = list(manifest_paths)

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "ManifestPaths" >> beam.Create(self.manifest_paths)
            | "ExpandFolders" >> beam.FlatMap(expand_manifest_path)
            | "ParseLines" >> beam.ParDo(ParseManifestFn()).with_outputs(FAILED, main="utterances")
        )
        utterances = parsed.utterances | "SpreadOverWorkers" >> beam.Reshuffle()
        return {"utterances": utterances, FAILED: parsed[FAILED]}


class TokenizeFn(beam.DoFn):
    """Utterance -> :class:`Transcribed`, or ``oov_transcript`` under the reject policy.

    Runs before audio is decoded so rejected transcripts cost no decoding.
    """

    def __init__(self, labels: Sequence[str], oov: str = "drop"):
        self.labels = tuple(labels)
        self.oov = oov
        self.dropped_chars = Metrics.counter(NAMESPACE, "oov_characters_dropped")
        self.rejected = _failure_counter("oov_transcript")

    def setup(self):
        from qn_keras.tokenizer import CharTokenizer

        self.tokenizer = CharTokenizer(self.labels)

    def process(self, utt: Utterance):
        from qn_keras.data.text import TranscriptError, tokenize_transcript

        try:
            text, ids, unknown = tokenize_transcript(self.tokenizer, utt.text, self.oov)
        except TranscriptError as e:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(FAILED, failure(utt, e.reason, str(e)))
            return
        if unknown:
            self.dropped_chars.inc(sum(unknown.values()))
        yield Transcribed(utt, text, tuple(ids))


def read_audio_source(path: str):
    """A local path as it is; a remote file (gs://, s3://, hdfs://) as its bytes, read through
    Beam's file systems (soundfile decodes both the same way). None if a remote file is
    missing."""
    if "://" not in path:
        return path
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return f.read()


def decode_utterance(
    item: Transcribed, sample_rate: int, min_samples: int, max_duration: float | None = None
) -> Decoded | dict:
    """Transcribed -> :class:`Decoded` 16 kHz mono waveform (offset/duration applied), or a
    failure record: ``missing_file``, ``unreadable_audio``, ``empty_audio``, ``non_finite``,
    ``too_short`` (fewer samples than two feature frames need), ``too_long``."""
    from qn_keras.audio import AudioError, check_waveform, decode_audio

    utt = item.utt
    try:
        source = read_audio_source(utt.audio_filepath)
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
        return failure(utt, e.reason, str(e))
    return Decoded(utt.utt_id, utt, item.text, item.labels, waveform)


def speed_suffix(rate: float) -> str:
    return f"_sp{rate:g}"


def perturb_speed(waveform: np.ndarray, rate: float, sample_rate: int) -> np.ndarray:
    """Plays ``waveform`` ``rate`` times as fast, changing tempo and pitch together (NeMo's
    ``SpeedPerturbation``, Kaldi's recipe): the audio is treated as sampled at
    ``rate * sample_rate`` and resampled back to ``sample_rate``."""
    from qn_keras.audio import resample

    return resample(waveform, int(round(sample_rate * rate)), sample_rate)


def speed_perturbed_copies(
    item: Decoded, rates: Sequence[float], sample_rate: int, min_samples: int
) -> list[Decoded | dict]:
    """The item itself plus one copy per rate (ids suffixed ``_sp<rate>``); a copy too short to
    featurize is a ``too_short`` failure under its own id."""
    copies: list[Decoded | dict] = [item]
    for rate in rates:
        if float(rate) == 1.0:
            continue
        utt_id = item.utt_id + speed_suffix(rate)
        waveform = perturb_speed(item.waveform, rate, sample_rate)
        if waveform.shape[0] < min_samples:
            message = (
                f"Speed {rate:g} copy has {waveform.shape[0]} samples, fewer than {min_samples}"
            )
            copies.append(failure(item.utt, "too_short", message, utt_id=utt_id))
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
        if isinstance(item, dict):
            continue
        for rate in rates:
            waveform = band_limit(item.waveform, int(rate), sample_rate)
            utt_id = item.utt_id + narrowband_suffix(int(rate))
            out.append(dataclasses.replace(item, utt_id=utt_id, waveform=waveform, narrowband=rate))
    return out


def featurize_decoded(featurizer, item: Decoded) -> Featurized | dict:
    """Decoded -> :class:`Featurized`; any error is a ``featurize_error`` failure record."""
    try:
        features = featurizer(item.waveform)
    except Exception as e:  # noqa: BLE001 - one bad utterance must not stop the job
        return failure(item.utt, FEATURIZE_ERROR, f"{type(e).__name__}: {e}", item.utt_id)
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


class DecodeAndFeaturizeFn(beam.DoFn):
    """A batch of :class:`Transcribed` -> :class:`Featurized` (main) and failures (``failed``):
    decode, speed-perturb, featurize each utterance with the one qn_keras featurizer.

    TensorFlow is imported and the featurizer's graph traced once per worker, in ``setup``.
    Utterances of a batch are processed on ``threads`` threads: decoding (libsndfile),
    resampling (scipy) and the featurizer's graph run outside the GIL, so one worker process
    uses several cores without paying TensorFlow's start-up (~5 s of CPU) in more processes.
    Each utterance is featurized on its own: measured on 2 cores, one compiled graph call per
    utterance (7 ms for 3 s of audio) beats padded batches of 8 (8.6 ms per utterance) and 32
    (16 ms), since the work grows with the samples and padding only adds to it.
    """

    def __init__(
        self,
        featurizer_config: dict,
        max_duration: float | None = None,
        speed_perturb: Sequence[float] = (),
        threads: int = 0,
        intra_op_threads: int = 0,
        narrowband: Sequence[int] = (),
    ):
        self.featurizer_config = dict(featurizer_config)
        self.max_duration = max_duration
        self.speed_perturb = tuple(float(r) for r in speed_perturb)
        self.narrowband = tuple(int(r) for r in narrowband)
        self.threads = threads
        self.intra_op_threads = intra_op_threads
        self.decoded = Metrics.counter(NAMESPACE, "audio_decoded")
        self.copies = Metrics.counter(NAMESPACE, "augmented_copies")  # speed and narrowband
        self.written = Metrics.counter(NAMESPACE, "utterances_featurized")
        self.audio_ms = Metrics.counter(NAMESPACE, "audio_milliseconds_featurized")
        self.frames = Metrics.distribution(NAMESPACE, "feature_frames")

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor

        import tensorflow as tf

        from qn_keras.featurizer import CompiledFeaturizer, FeaturizerConfig

        if self.intra_op_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.intra_op_threads)
            except RuntimeError:
                pass  # The runtime is already up (in-process runner): keep its threads.
        self.featurizer = CompiledFeaturizer(FeaturizerConfig.from_dict(self.featurizer_config))
        self.pool = ThreadPoolExecutor(max(1, self.threads or os.cpu_count() or 1))

    def teardown(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown()

    def _one(self, item: Transcribed) -> tuple[bool, list]:
        config = self.featurizer.config
        decoded = decode_utterance(item, config.sample_rate, config.min_samples, self.max_duration)
        if isinstance(decoded, dict):
            return False, [decoded]
        copies = speed_perturbed_copies(
            decoded, self.speed_perturb, config.sample_rate, config.min_samples
        )
        copies = narrowband_copies(copies, self.narrowband, config.sample_rate)
        featurized = [
            c if isinstance(c, dict) else featurize_decoded(self.featurizer, c) for c in copies
        ]
        return True, featurized

    def process(self, batch: list):
        # Metrics are counted here, on the bundle's thread: Beam attributes counters by thread.
        for decoded, outcomes in self.pool.map(self._one, batch):
            if decoded:
                self.decoded.inc()
            for outcome in outcomes:
                if isinstance(outcome, dict):
                    _failure_counter(outcome["reason"]).inc()
                    yield beam.pvalue.TaggedOutput(FAILED, outcome)
                    continue
                if not outcome.is_source:
                    self.copies.inc()
                self.written.inc()
                self.frames.update(outcome.num_frames)
                self.audio_ms.inc(int(round(outcome.duration * 1000)))
                yield outcome


def to_tf_example(item: Featurized) -> bytes:
    from qn_keras.data.schema import serialize_utterance

    return serialize_utterance(
        item.features, item.labels, item.text, item.duration, item.utt_id, item.utt.audio_filepath
    )


class FeaturizeUtterances(beam.PTransform):
    """Utterances -> :class:`Featurized` (main) and failures (``failed``): tokenize, then decode,
    speed-perturb and featurize in batches (see :class:`DecodeAndFeaturizeFn`)."""

    def __init__(
        self,
        featurizer_config: dict,
        labels: Sequence[str],
        oov: str = "drop",
        max_duration: float | None = None,
        speed_perturb: Iterable[float] = (),
        threads: int = 0,
        intra_op_threads: int = 0,
        max_batch_size: int = 32,
        narrowband: Iterable[int] = (),
    ):
        super().__init__()
        self.narrowband = tuple(narrowband)
        self.featurizer_config = dict(featurizer_config)
        self.labels = tuple(labels)
        self.oov = oov
        self.max_duration = max_duration
        self.speed_perturb = tuple(speed_perturb)
        self.threads = threads
        self.intra_op_threads = intra_op_threads
        self.max_batch_size = max_batch_size

    def expand(self, utterances):
        tokenized = utterances | "Tokenize" >> beam.ParDo(
            TokenizeFn(self.labels, self.oov)
        ).with_outputs(FAILED, main="ok")
        featurized = (
            tokenized.ok
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
            | "DecodeAndFeaturize"
            >> beam.ParDo(
                DecodeAndFeaturizeFn(
                    self.featurizer_config,
                    self.max_duration,
                    self.speed_perturb,
                    self.threads,
                    self.intra_op_threads,
                    self.narrowband,
                )
            ).with_outputs(FAILED, main="ok")
        )
        failures = (tokenized[FAILED], featurized[FAILED]) | "FlattenFailures" >> beam.Flatten()
        return {"featurized": featurized.ok, FAILED: failures}
