"""Training and validation corpora for the trainer: TFRecord shards, or a manifest featurized once.

A :class:`DataSource` is TFRecord shards in THE schema (:mod:`qn_keras.data.schema`) plus what
the trainer needs to know about them (utterances, hours, front end, vocabulary). A ``qn
features`` folder is used as it is. A manifest is featurized once, with the run's front end and
tokenizer, into a single TFRecord file in a cache folder (reused when the same run is started
again, so a resumed run does not featurize again), then read the same way.

Each epoch gets a freshly built dataset whose shuffle seed is ``seed + epoch``, read in a
deterministic order, so a run resumed mid-epoch can skip exactly the batches it had done.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import tensorflow as tf

from qn_keras import files
from qn_keras.data import reader, schema
from qn_keras.data.dataset_info import DATASET_INFO, DatasetInfo, length_histogram
from qn_keras.data.manifest import MANIFEST_EXTENSIONS, Failure, read_utterances
from qn_keras.data.records import to_tf_example, utterance_records
from qn_keras.errors import UserInputError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DataSource:
    """TFRecord shards and what is known about them.

    Attributes:
        path: a ``qn features`` folder, a TFRecord file, or a list of files.
        num_utterances: utterances in the shards.
        hours: hours of audio in the shards.
        description: where the data came from, for messages and the report.
        featurizer: the front-end settings the features were computed with, if recorded.
        labels: the vocabulary the token ids refer to, if recorded.
        length_histogram: ``{"bin_width", "counts"}`` of feature lengths, if known.
    """

    path: object
    num_utterances: int
    hours: float
    description: str = ""
    featurizer: dict | None = None
    labels: list | None = None
    length_histogram: dict | None = None

    def bucket_boundaries(self, setting):
        """Resolves ``data.bucket_boundaries``: a list, None, or "auto" (from the histogram)."""
        if setting != "auto":
            return list(setting) if setting else None
        if self.length_histogram:
            return reader.boundaries_from_histogram(self.length_histogram) or None
        return None

    def dataset(
        self,
        batch_size: int,
        *,
        training: bool,
        seed: int = 0,
        epoch: int = 0,
        bucket_boundaries=None,
        drop_remainder: bool = False,
        with_metadata: bool = False,
        num_labels: int | None = None,
        bad_records: str = "raise",
    ) -> tf.data.Dataset:
        """One pass over the data: shuffled with ``seed + epoch`` when ``training``, in file
        order otherwise; always in a deterministic order. Every record is checked as it is
        read (``num_labels`` bounds the label ids; ``bad_records`` as
        :func:`~qn_keras.data.reader.tfrecord_dataset`)."""
        return reader.tfrecord_dataset(
            self.path,
            batch_size,
            shuffle=training,
            seed=seed + epoch,
            bucket_boundaries=bucket_boundaries,
            deterministic=True,
            repeat=False,
            drop_remainder=drop_remainder,
            with_metadata=with_metadata,
            num_labels=num_labels,
            bad_records=bad_records,
        )

    def check_compatible(self, tokenizer, featurizer) -> None:
        """ValueError if the shards were made with another vocabulary or front end."""
        if self.labels is not None and list(self.labels) != list(tokenizer.labels):
            raise UserInputError(
                f"{self.description}: its token ids use the vocabulary {self.labels!r}, but the "
                f"model uses {list(tokenizer.labels)!r}. Featurize again with the model's labels "
                "or set `labels:` in the config."
            )
        if self.featurizer is not None:
            from qn_keras.featurizer import FeaturizerConfig

            mine = featurizer.to_dict()
            # Keys older data lack mean their defaults (per-utterance normalization, say).
            theirs = FeaturizerConfig.from_dict(self.featurizer).to_dict()
            # Dither only acts while training the featurizer itself; features are stored without.
            diff = {
                k: (theirs[k], mine[k]) for k in theirs if k != "dither" and theirs[k] != mine[k]
            }
            if diff:
                detail = ", ".join(f"{k}: data {a!r} vs model {b!r}" for k, (a, b) in diff.items())
                raise UserInputError(
                    f"{self.description}: features were computed with other front-end settings "
                    f"({detail}). Featurize again (`qn features --era ...`) or change "
                    "`featurizer:` in the config."
                )


def _scan(files, compression) -> tuple[int, float, dict]:
    """Counts utterances, hours and a feature-length histogram by reading the shards."""
    spec = {
        schema.FEATURE_LENGTH: tf.io.FixedLenFeature([], tf.int64),
        schema.DURATION: tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    }
    ds = tf.data.TFRecordDataset(files, compression_type=compression or "")
    ds = ds.batch(1024).map(lambda s: tf.io.parse_example(s, spec))
    count, seconds, lengths = 0, 0.0, []
    for batch in ds:
        n = batch[schema.FEATURE_LENGTH].numpy()
        count += len(n)
        seconds += float(batch[schema.DURATION].numpy().sum())
        lengths.extend(n.tolist())
    return count, seconds / 3600.0, length_histogram(lengths)


def from_tfrecords(path) -> DataSource:
    """A :class:`DataSource` for a ``qn features`` folder or TFRecord file(s)."""
    files, compression, info = reader._shard_files(path)
    if info is not None:
        parsed = DatasetInfo.from_dict(info, f"{path}/{DATASET_INFO}")
        count, hours, histogram = parsed.num_utterances, parsed.hours, parsed.length_histogram
        featurizer, labels = parsed.featurizer, parsed.labels
    else:  # bare TFRecord files: count them
        count, hours, histogram = _scan(files, compression)
        featurizer = labels = None
    if count == 0:
        raise UserInputError(f"{path} holds no utterances.")
    return DataSource(
        path=os.fspath(path) if not isinstance(path, list | tuple) else list(path),
        num_utterances=int(count),
        hours=float(hours),
        description=str(path),
        featurizer=featurizer,
        labels=labels,
        length_histogram=histogram,
    )


def featurize_manifest(
    manifest,
    tokenizer,
    featurizer,
    cache_dir,
    *,
    max_duration: float | None = None,
    progress: bool = False,
) -> DataSource:
    """Featurizes a manifest once into ``cache_dir`` and returns it as a :class:`DataSource`.

    The cache file name hashes the manifest's path, size and modification time with the front
    end, vocabulary and duration limit, so a changed input is featurized again. Utterances that
    cannot be used are skipped (the reader logs how many and why).
    """
    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"Manifest not found: {manifest}")
    stat = manifest.stat()
    key = json.dumps(
        [
            str(manifest.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            featurizer.to_dict(),
            list(tokenizer.labels),
            max_duration,
            schema.SCHEMA_VERSION,
            "records-2",  # made by qn_keras.data.records (the feature job's chain)
        ],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{manifest.stem}-{digest}.tfrecord"
    info_path = target.with_suffix(".json")
    if target.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
    else:
        info = _write_manifest_records(
            manifest, tokenizer, featurizer, target, max_duration, progress
        )
        files.write_json(info_path, info)
    if info["num_utterances"] == 0:
        raise UserInputError(f"No usable utterances in {manifest}.")
    return DataSource(
        path=str(target),
        num_utterances=info["num_utterances"],
        hours=info["hours"],
        description=str(manifest),
        featurizer=featurizer.to_dict(),
        labels=list(tokenizer.labels),
        length_histogram=info["length_histogram"],
    )


def _write_manifest_records(manifest, tokenizer, featurizer, target, max_duration, progress):
    """The manifest's records, made by the feature job's own per-utterance chain
    (:func:`qn_keras.data.records.utterance_records`); unusable utterances are counted by
    reason in a warning, as ``qn features`` lists them in ``failures.jsonl``."""
    from tqdm import tqdm

    from qn_keras.featurizer import CompiledFeaturizer

    compiled = CompiledFeaturizer(featurizer)
    count, seconds, lengths, failed = 0, 0.0, [], collections.Counter()
    with files.atomic_path(target) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
        items = tqdm(
            list(read_utterances(manifest)),
            desc=f"featurizing {manifest.name}",
            unit="utt",
            disable=not progress,
        )
        for item in items:
            if isinstance(item, Failure):
                failed[item.reason] += 1
                continue
            for out in utterance_records(item, tokenizer, compiled, max_duration=max_duration):
                if isinstance(out, Failure):
                    failed[out.reason] += 1
                    continue
                writer.write(to_tf_example(out))
                count += 1
                seconds += out.duration
                lengths.append(out.num_frames)
    if failed:
        logger.warning(
            "%s: skipped %d utterances: %s",
            manifest,
            sum(failed.values()),
            dict(sorted(failed.items())),
        )
    return {
        "num_utterances": count,
        "hours": seconds / 3600.0,
        "length_histogram": length_histogram(lengths),
    }


def is_manifest(path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS


def open_data(
    path,
    tokenizer,
    featurizer,
    cache_dir,
    *,
    max_duration: float | None = None,
    progress: bool = False,
) -> DataSource:
    """A ``qn features`` folder, TFRecord file(s) or a manifest, checked against the model's
    vocabulary and front end; a list of such folders and manifests is read as one corpus."""
    if isinstance(path, list | tuple):
        if not path:
            raise UserInputError("No training data given.")
        if len(path) > 1:
            options = {"max_duration": max_duration, "progress": progress}
            parts = [open_data(p, tokenizer, featurizer, cache_dir, **options) for p in path]
            return combine_sources(parts)
        path = path[0]
    if isinstance(path, str | os.PathLike) and is_manifest(path):
        source = featurize_manifest(
            path, tokenizer, featurizer, cache_dir, max_duration=max_duration, progress=progress
        )
    else:
        if isinstance(path, str | os.PathLike) and not Path(path).exists() and "*" not in str(path):
            raise FileNotFoundError(
                f"Training data not found: {path} (expected a `qn features` folder, TFRecord "
                "files or a manifest .json)"
            )
        source = from_tfrecords(path)
    source.check_compatible(tokenizer, featurizer)
    return source


def combine_sources(parts: list[DataSource]) -> DataSource:
    """Several sources (each already checked against the model) as one: their shards read as
    one shuffled corpus, counts and length histograms added up. How ``qn train --train A
    --train B`` trains on feature folders made separately (by corpus, or in parts small enough
    for one machine's memory)."""
    files, compressions = [], set()
    for part in parts:
        shard_files, compression, _ = reader._shard_files(part.path)
        files += shard_files
        compressions.add(compression)
    if len(compressions) > 1:
        raise UserInputError(
            "The training data mixes gzip-compressed and uncompressed TFRecords "
            f"({', '.join(p.description for p in parts)}), which are read as one stream: "
            "make every part with the same `qn features --compression` (manifests the trainer "
            "featurizes itself are uncompressed, so pass those through `qn features` too)."
        )
    histograms = [p.length_histogram for p in parts]
    histogram = None
    if all(histograms) and len({h["bin_width"] for h in histograms}) == 1:
        width = max(len(h["counts"]) for h in histograms)
        counts = [sum(h["counts"][i] for h in histograms if i < len(h["counts"])) for i in
                  range(width)]  # fmt: skip
        histogram = {**histograms[0], "counts": counts}
    return DataSource(
        path=files,
        num_utterances=sum(p.num_utterances for p in parts),
        hours=sum(p.hours for p in parts),
        description=" + ".join(p.description for p in parts),
        featurizer=next((p.featurizer for p in parts if p.featurizer is not None), None),
        labels=next((p.labels for p in parts if p.labels is not None), None),
        length_histogram=histogram,
    )


def steps_per_epoch(num_utterances: int, global_batch_size: int) -> int:
    """Batches in one pass without bucketing (the estimate the schedule's horizon uses)."""
    return max(1, math.ceil(num_utterances / global_batch_size))
