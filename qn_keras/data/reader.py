"""``tf.data`` input for training and evaluation, from the pipeline's TFRecords or straight from
manifests (featurized on the fly with the same :class:`~qn_keras.featurizer.LogMelSpectrogram`).

Both readers yield the same elements::

    ((features [B, T, num_mels] float32, feature_lengths [B] int32),
     (labels [B, U] int32, label_lengths [B] int32))

Features past each length are 0; labels past each length are ``label_pad_value`` (0 by
default; CTC losses must use ``label_lengths``). With ``with_metadata=True`` a third element
``{"utt_id", "transcript", "duration", "problem"}`` (each ``[B]``) follows.

Every record is checked as it is parsed (:mod:`qn_keras.data.validation`: features that are
not finite or do not match their lengths, label ids outside the vocabulary). With
``bad_records="raise"`` (the default) iterating reaches an ``InvalidArgumentError`` naming the
utterance and its file, before the batch holding it is handed out;
:func:`raise_corrupt_record` turns it into :class:`~qn_keras.data.validation.CorruptRecordError`.
With ``"keep"`` the record is replaced by a one-frame silent stand-in with one label, and
its metadata ``problem`` says what was wrong, for callers that report per utterance.
"""

from __future__ import annotations

import collections
import glob
import logging
import os

import numpy as np
import tensorflow as tf

from qn_keras.audio import AudioError, check_waveform, decode_audio
from qn_keras.data import schema, validation
from qn_keras.data.dataset_info import DATASET_INFO, length_histogram, read_dataset_info
from qn_keras.data.manifest import ManifestFailure, read_utterances
from qn_keras.data.text import OOV_POLICIES, TranscriptError, tokenize_transcript
from qn_keras.errors import UserInputError
from qn_keras.featurizer import FeaturizerConfig, LogMelSpectrogram

logger = logging.getLogger(__name__)

_AUTO = "auto"


def _shard_files(path_or_dir) -> tuple[list[str], str | None, dict | None]:
    """Shard paths, their compression ("GZIP" or None), and the dataset info if any."""
    if isinstance(path_or_dir, list | tuple):
        files = [os.fspath(p) for p in path_or_dir]
        info = None
    else:
        path = os.fspath(path_or_dir)
        if tf.io.gfile.isdir(path):
            info = read_dataset_info(path)
            files = [os.path.join(path, name) for name in info["shards"]]
            missing = [f for f in files if not tf.io.gfile.exists(f)]
            if missing:
                raise FileNotFoundError(f"Shards listed in {DATASET_INFO} are missing: {missing}")
        else:
            info = None
            files = sorted(tf.io.gfile.glob(path)) if glob.has_magic(path) else [path]
    if not files:
        raise FileNotFoundError(f"No TFRecord files found at {path_or_dir}")
    if info is not None:
        compression = info.get("compression")
    else:
        compression = "GZIP" if files[0].endswith(".gz") else None
    return files, (compression.upper() if compression else None), info


def _num_mels(files: list[str], compression: str | None, info: dict | None) -> int | None:
    """Feature width, from the dataset info or else the first record (a fixed-shard job with
    more shards than utterances writes empty shards, so the first file may hold none)."""
    if info and "featurizer" in info:
        return int(info["featurizer"]["num_mels"])
    for path in files:
        for record in tf.data.TFRecordDataset(path, compression_type=compression or "").take(1):
            return schema.parse_example_numpy(record.numpy())[schema.FEATURES].shape[1]
    return None


def raise_corrupt_record(error: BaseException) -> None:
    """Re-raises a dataset iteration error from a bad record as CorruptRecordError."""
    message = validation.corrupt_record_message(error)
    if message is None:
        raise error
    raise validation.CorruptRecordError(f"Corrupt input record: {message}") from None


def _checked(record: dict, source, bad_records: str) -> dict:
    """Applies the ``bad_records`` policy to a parsed record (see the module docstring)."""
    problem = record[schema.PROBLEM]
    if bad_records == "raise":
        with tf.control_dependencies(
            [validation.assert_usable(problem, record[schema.UTT_ID], source)]
        ):
            return {**record, schema.FEATURES: tf.identity(record[schema.FEATURES])}
    bad = tf.not_equal(problem, "")
    features = record[schema.FEATURES]
    stand_in = tf.zeros([1, tf.shape(features)[1]], features.dtype)
    return {
        **record,
        schema.FEATURES: tf.cond(bad, lambda: stand_in, lambda: features),
        schema.FEATURE_LENGTH: tf.where(bad, 1, record[schema.FEATURE_LENGTH]),
        # One label (id 0): TensorFlow's CTC loss refuses empty ones, and the stand-in's loss
        # is never counted.
        schema.LABELS: tf.cond(bad, lambda: tf.zeros([1], tf.int32), lambda: record[schema.LABELS]),
        "label_length": tf.where(bad, 1, record["label_length"]),
    }


def _check_policy(bad_records: str, with_metadata: bool) -> None:
    if bad_records not in validation.BAD_RECORD_POLICIES:
        raise UserInputError(
            f"bad_records must be one of {validation.BAD_RECORD_POLICIES}. "
            f"Received: {bad_records!r}"
        )
    if bad_records == "keep" and not with_metadata:
        raise UserInputError("bad_records='keep' needs with_metadata=True (its 'problem' entry).")


def _as_training_tuple(record: dict, with_metadata: bool):
    inputs = (record[schema.FEATURES], record[schema.FEATURE_LENGTH])
    targets = (record[schema.LABELS], record["label_length"])
    if not with_metadata:
        return inputs, targets
    meta = {
        schema.UTT_ID: record[schema.UTT_ID],
        schema.TRANSCRIPT: record[schema.TRANSCRIPT],
        schema.DURATION: record[schema.DURATION],
        schema.PROBLEM: record[schema.PROBLEM],
    }
    return inputs, targets, meta


def boundaries_from_histogram(histogram: dict, num_buckets: int = 8) -> list[int]:
    """Bucket boundaries (in frames) at equal-count quantiles of a length histogram.

    ``histogram`` is the pipeline's ``{"bin_width": W, "counts": [...]}`` where bin ``i``
    holds lengths in ``[i*W, (i+1)*W)``.
    """
    width = int(histogram["bin_width"])
    counts = np.asarray(histogram["counts"], dtype=np.float64)
    total = counts.sum()
    if total == 0 or num_buckets < 2:
        return []
    cumulative = np.cumsum(counts) / total
    edges = []
    for q in np.arange(1, num_buckets) / num_buckets:
        edge = (int(np.searchsorted(cumulative, q)) + 1) * width
        if edge not in edges:
            edges.append(edge)
    top = len(counts) * width
    return [e for e in edges if e < top]


def boundaries_from_lengths(lengths, num_buckets: int = 8) -> list[int]:
    return boundaries_from_histogram(length_histogram(lengths), num_buckets)


def _batch(
    dataset: tf.data.Dataset,
    batch_size: int,
    bucket_boundaries,
    drop_remainder: bool,
    label_pad_value: int,
    with_metadata: bool,
) -> tf.data.Dataset:
    padding = ((0.0, 0), (label_pad_value, 0))
    if with_metadata:
        padding = (
            *padding,
            {schema.UTT_ID: "", schema.TRANSCRIPT: "", schema.DURATION: 0.0, schema.PROBLEM: ""},
        )
    if bucket_boundaries:
        return dataset.bucket_by_sequence_length(
            element_length_func=lambda inputs, *rest: inputs[1],
            bucket_boundaries=[int(b) for b in bucket_boundaries],
            bucket_batch_sizes=[batch_size] * (len(bucket_boundaries) + 1),
            padding_values=padding,
            drop_remainder=drop_remainder,
        )
    return dataset.padded_batch(batch_size, padding_values=padding, drop_remainder=drop_remainder)


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    return options


def tfrecord_dataset(
    path_or_dir,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int | None = None,
    bucket_boundaries="auto",
    deterministic: bool = False,
    repeat: bool = False,
    drop_remainder: bool = False,
    shuffle_buffer: int = 2048,
    label_pad_value: int = 0,
    with_metadata: bool = False,
    num_labels: int | None = None,
    bad_records: str = "raise",
) -> tf.data.Dataset:
    """Padded, optionally length-bucketed batches from the pipeline's TFRecord shards.

    Args:
        path_or_dir: a ``qn features`` output folder (its ``dataset_info.json`` lists the shards
            and their compression), a shard file, a glob, or a list of shard files.
        batch_size: utterances per batch.
        shuffle: shuffle shard order and utterances (through a ``shuffle_buffer`` buffer).
        seed: shuffling seed. Each pass over the data is shuffled differently, but the same seed
            gives the same sequence of passes.
        bucket_boundaries: frame counts separating length buckets; each batch is drawn from one
            bucket so it carries little padding. ``"auto"`` takes ~8 equal-count buckets from the
            folder's length histogram; None or ``[]`` disables bucketing.
        deterministic: the same order on every run (a fixed seed, 0 unless given, and ordered
            parallel reads); otherwise parallel reads may reorder elements for speed.
        repeat: repeat indefinitely.
        drop_remainder: drop each bucket's last partial batch.
        label_pad_value: value of label positions past each label length.
        with_metadata: add a third element with utterance ids, transcripts, durations and
            problems.
        num_labels: label ids must be below it (the tokenizer's number of labels); None
            checks only that they are not negative.
        bad_records: "raise" or "keep" (see the module docstring).

    Example:
        >>> ds = tfrecord_dataset("features/train", batch_size=32, seed=1)  # doctest: +SKIP
        >>> (feats, feat_lens), (labels, label_lens) = next(iter(ds))  # doctest: +SKIP
    """
    _check_policy(bad_records, with_metadata)
    files, compression, info = _shard_files(path_or_dir)
    num_mels = _num_mels(files, compression, info)
    if deterministic and seed is None:
        seed = 0
    if isinstance(bucket_boundaries, str):
        if bucket_boundaries != _AUTO:
            raise UserInputError(
                f"bucket_boundaries must be 'auto', a list or None: {bucket_boundaries}"
            )
        histogram = (info or {}).get("length_histogram")
        bucket_boundaries = boundaries_from_histogram(histogram) if histogram else None

    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle and len(files) > 1:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    # Each record travels with its shard's path, so a bad one can be named with its file.
    dataset = dataset.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression or "").map(
            lambda s: (s, f)
        ),
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.map(
        lambda s, f: _as_training_tuple(
            _checked(schema.parse_example(s, num_mels, num_labels), f, bad_records), with_metadata
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    dataset = _batch(
        dataset, batch_size, bucket_boundaries, drop_remainder, label_pad_value, with_metadata
    )
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic))


class _ManifestSource:
    """Python side of :func:`manifest_dataset`: decodes audio and tokenizes transcripts,
    skipping (and counting) every utterance that cannot be used."""

    def __init__(self, utterances, tokenizer, config, max_duration, oov, bad_lines):
        self.utterances = utterances
        self.tokenizer = tokenizer
        self.config = config
        self.max_duration = max_duration
        self.oov = oov
        self.skipped = collections.Counter(bad_lines)

    def _load(self, utt):
        text, labels, _ = tokenize_transcript(self.tokenizer, utt.text, self.oov)
        waveform = decode_audio(
            utt.audio_filepath,
            target_rate=self.config.sample_rate,
            offset=utt.offset,
            duration=utt.read_duration,
        )
        check_waveform(
            waveform,
            self.config.min_samples,
            self.config.sample_rate,
            self.max_duration,
            name=utt.audio_filepath,
        )
        return waveform, np.asarray(labels, np.int32), text

    def __call__(self):
        skipped = collections.Counter()
        for utt in self.utterances:
            try:
                waveform, labels, text = self._load(utt)
            except (AudioError, TranscriptError) as e:
                skipped[e.reason] += 1
                continue
            yield waveform, labels, utt.utt_id, text, os.fspath(utt.audio_filepath)
        total = skipped + self.skipped
        if total:
            logger.warning(
                "manifest_dataset skipped %d of %d utterances: %s",
                sum(total.values()),
                len(self.utterances) + sum(self.skipped.values()),
                dict(sorted(total.items())),
            )


def manifest_dataset(
    manifest_paths,
    tokenizer,
    featurizer_config: FeaturizerConfig | None,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int | None = None,
    bucket_boundaries="auto",
    deterministic: bool = False,
    repeat: bool = False,
    drop_remainder: bool = False,
    shuffle_buffer: int = 2048,
    max_duration: float | None = None,
    oov: str = "drop",
    cache: bool = True,
    label_pad_value: int = 0,
    with_metadata: bool = False,
    bad_records: str = "raise",
) -> tf.data.Dataset:
    """Batches like :func:`tfrecord_dataset`, featurizing manifests' audio on the fly.

    For small corpora (``qn train --train manifest.json``): audio is decoded in Python, then
    featurized in the graph by the same ``LogMelSpectrogram`` the pipeline uses, without
    dither. Unusable utterances (bad manifest lines, missing or broken audio, too short or
    longer than ``max_duration``, and, with ``oov="reject"``, transcripts with characters
    outside the vocabulary) are skipped and counted in a warning after each pass.

    Args:
        manifest_paths: one manifest (NeMo JSON lines, CSV/TSV, LibriSpeech folder) or a list.
        tokenizer: a :class:`~qn_keras.tokenizer.CharTokenizer`.
        featurizer_config: front-end settings (defaults when None).
        cache: keep the featurized utterances in memory after the first pass.
        Other arguments: as :func:`tfrecord_dataset`; ``"auto"`` bucket boundaries come from
        the manifests' declared durations.
    """
    if oov not in OOV_POLICIES:
        raise UserInputError(f"oov must be one of {OOV_POLICIES}. Received: oov={oov!r}")
    _check_policy(bad_records, with_metadata)
    config = featurizer_config or FeaturizerConfig()
    if isinstance(manifest_paths, str | os.PathLike):
        manifest_paths = [manifest_paths]
    utterances, bad_lines = [], collections.Counter()
    for path in manifest_paths:
        for item in read_utterances(path):
            if isinstance(item, ManifestFailure):
                bad_lines[item.reason] += 1
            else:
                utterances.append(item)
    if not utterances:
        raise UserInputError(f"No usable utterances in {list(map(str, manifest_paths))}")
    if deterministic and seed is None:
        seed = 0
    if isinstance(bucket_boundaries, str):
        if bucket_boundaries != _AUTO:
            raise UserInputError(
                f"bucket_boundaries must be 'auto', a list or None: {bucket_boundaries}"
            )
        durations = [u.duration for u in utterances if u.duration is not None]
        frames = [config.num_frames(int(d * config.sample_rate)) for d in durations]
        bucket_boundaries = boundaries_from_lengths(frames)

    source = _ManifestSource(utterances, tokenizer, config, max_duration, oov, bad_lines)
    dataset = tf.data.Dataset.from_generator(
        source,
        output_signature=(
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.string),
            tf.TensorSpec([], tf.string),
            tf.TensorSpec([], tf.string),
        ),
    )
    layer = LogMelSpectrogram(**config.to_dict())

    def featurize(waveform, labels, utt_id, text, path):
        num_samples = tf.shape(waveform)[0]
        features, lengths = layer(waveform[None, :], num_samples[None], training=False)
        features = features[0, : lengths[0]]
        # Finite audio can still give non-finite features (float files far beyond full scale).
        record = {
            schema.FEATURES: features,
            schema.FEATURE_LENGTH: lengths[0],
            schema.LABELS: labels,
            "label_length": tf.size(labels, out_type=tf.int32),
            schema.UTT_ID: utt_id,
            schema.TRANSCRIPT: text,
            schema.DURATION: tf.cast(num_samples, tf.float32) / float(config.sample_rate),
            schema.PROBLEM: validation.feature_problem(features),
        }
        return _checked(record, path, bad_records)

    dataset = dataset.map(featurize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        dataset = dataset.cache()
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.map(lambda r: _as_training_tuple(r, with_metadata))
    dataset = _batch(
        dataset, batch_size, bucket_boundaries, drop_remainder, label_pad_value, with_metadata
    )
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic))
