"""The feature job's stages: small DoFns and composites, each testable on in-memory input.

Elements flowing through the job:

- :class:`qn_keras.data.Utterance` from the manifest readers;
- :class:`Transcribed`: an utterance with its normalized transcript and token ids;
- :class:`Decoded`: plus its 16 kHz mono waveform (and speed-perturbed copies of it);
- :class:`Featurized`: features and everything the TFRecord holds;
- :class:`qn_keras.data.manifest.Failure` in place of an element that could not be used;
  :class:`SplitFailures` separates them (into ``failed``, written to ``failures.jsonl``).

The per-utterance work itself lives in :mod:`qn_keras.data.records` (the trainer's manifest
cache runs the same functions); this module adds Beam: parallelism, counters, tagged outputs.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from qn_keras.data.manifest import Failure, Utterance, manifest_kind, parse_lines
from qn_keras.data.records import (  # noqa: F401  (re-exported: the job's element types)
    FEATURIZE_ERROR,
    Decoded,
    Featurized,
    Transcribed,
    band_limit,
    decode_utterance,
    featurize_decoded,
    narrowband_copies,
    narrowband_suffix,
    perturb_speed,
    speed_perturbed_copies,
    speed_suffix,
    to_tf_example,
    tokenize_utterance,
)

FAILED = "failed"
NAMESPACE = "qn_features"

logger = logging.getLogger(__name__)


def _is_failure(element) -> bool:
    return isinstance(element, Failure)


def _is_result(element) -> bool:
    return not isinstance(element, Failure)


class SplitFailures(beam.PTransform):
    """One PCollection of results and :class:`Failure` s -> ``{"ok": results, "failed":
    failures}``.

    Why not ``ParDo(...).with_outputs(FAILED)``: not every runner routes tagged outputs. Beam's
    DaskRunner (2.77) hands every consumer of a multi-output ParDo all of its outputs
    (measured: failure counting received utterances), so the job uses one output per DoFn and
    splits it with two plain filters, which every runner runs the same way."""

    def expand(self, results):
        return {
            "ok": results | "Results" >> beam.Filter(_is_result),
            FAILED: results | "Failures" >> beam.Filter(_is_failure),
        }


BATCH_KEYS = 256


def _batch_key(item: Transcribed) -> int:
    # A stable hash (Python's str hash differs between worker processes).
    return zlib.crc32(item.utt.utt_id.encode("utf-8")) % BATCH_KEYS


def _chunks(keyed, size: int):
    items = sorted(keyed[1], key=lambda t: t.utt.utt_id)
    for i in range(0, len(items), size):
        yield items[i : i + size]


class BatchUtterances(beam.PTransform):
    """Utterances -> lists of at most ``max_batch_size``, for DoFns that spread a batch over
    threads.

    Why not ``beam.BatchElements``: it emits its last partial batch from ``finish_bundle``, and
    Beam's DaskRunner (2.77) collects a bundle's outputs before calling ``finish_bundle``, so
    that batch is lost there (measured: 4 of 5 utterances written). Grouping by a hash of the
    utterance id into ``BATCH_KEYS`` groups, then cutting each group into chunks, emits
    everything from ``process`` on every runner."""

    def __init__(self, max_batch_size: int = 32):
        super().__init__()
        self.max_batch_size = max_batch_size

    def expand(self, items):
        return (
            items
            | "KeyByHash" >> beam.Map(lambda t: (_batch_key(t), t))
            | "Group" >> beam.GroupByKey()
            | "Chunk" >> beam.FlatMap(_chunks, self.max_batch_size)
        )


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
            yield Failure.of(None, "bad_manifest_line", f"Cannot read manifest: {e}", source=path)
            return
        for item in parse_lines(lines, path, kind):
            if isinstance(item, Failure):
                self.bad_lines.inc()
                yield item
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
            | "ParseLines" >> beam.ParDo(ParseManifestFn())
            | "SplitBadLines" >> SplitFailures()
        )
        utterances = parsed["ok"] | "SpreadOverWorkers" >> beam.Reshuffle()
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
        transcribed, dropped = tokenize_utterance(utt, self.tokenizer, self.oov)
        if isinstance(transcribed, Failure):
            self.rejected.inc()
            yield transcribed
            return
        if dropped:
            self.dropped_chars.inc(dropped)
        yield transcribed


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
        decoded = decode_utterance(
            item, config.sample_rate, config.min_samples, self.max_duration, read_audio_source
        )
        if isinstance(decoded, Failure):
            return False, [decoded]
        copies = speed_perturbed_copies(
            decoded, self.speed_perturb, config.sample_rate, config.min_samples
        )
        copies = narrowband_copies(copies, self.narrowband, config.sample_rate)
        featurized = [
            c if isinstance(c, Failure) else featurize_decoded(self.featurizer, c) for c in copies
        ]
        return True, featurized

    def process(self, batch: list):
        # Metrics are counted here, on the bundle's thread: Beam attributes counters by thread.
        for decoded, outcomes in self.pool.map(self._one, batch):
            if decoded:
                self.decoded.inc()
            for outcome in outcomes:
                if isinstance(outcome, Failure):
                    _failure_counter(outcome.reason).inc()
                    yield outcome
                    continue
                if not outcome.is_source:
                    self.copies.inc()
                self.written.inc()
                self.frames.update(outcome.num_frames)
                self.audio_ms.inc(int(round(outcome.duration * 1000)))
                yield outcome


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
        tokenized = (
            utterances
            | "Tokenize" >> beam.ParDo(TokenizeFn(self.labels, self.oov))
            | "SplitRejected" >> SplitFailures()
        )
        featurized = (
            tokenized["ok"]
            | "Batch" >> BatchUtterances(self.max_batch_size)
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
            )
            | "SplitFailed" >> SplitFailures()
        )
        failures = (tokenized[FAILED], featurized[FAILED]) | "FlattenFailures" >> beam.Flatten()
        return {"featurized": featurized["ok"], FAILED: failures}
