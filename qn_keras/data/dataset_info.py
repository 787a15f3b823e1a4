"""THE format of a feature folder's ``dataset_info.json``: built by the Beam job (which writes it
last, after every shard is in place) and read by the trainer, the evaluator and the reader.
Writer and reader use the keys below and nothing else.

=======================  ==================================================================
key                      value
=======================  ==================================================================
``schema_version``       :data:`qn_keras.data.schema.SCHEMA_VERSION` of the records
``shards``               shard file names, relative to the folder
``compression``          ``"GZIP"`` or null
``num_utterances``       records written (speed/narrowband copies included)
``hours``                hours of audio behind them
``featurizer``           :class:`~qn_keras.featurizer.FeaturizerConfig` as a dict
``tokenizer``            ``{"labels": [...]}`` the label ids refer to
``length_histogram``     ``{"unit": "frames", "bin_width": W, "counts": [...]}``
=======================  ==================================================================

Other keys (counts by source, failures, the pipeline's settings) are informational.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterable

import tensorflow as tf

from qn_keras.errors import UserInputError

DATASET_INFO = "dataset_info.json"
HISTOGRAM_BIN_FRAMES = 50


def length_histogram(lengths_or_bins, bin_width: int = HISTOGRAM_BIN_FRAMES) -> dict:
    """The ``length_histogram`` entry: bin ``i`` counts lengths in ``[i*W, (i+1)*W)``.

    Takes lengths in frames, or a ``Counter`` of bin indices (what an incremental combiner
    keeps)."""
    if isinstance(lengths_or_bins, collections.Counter):
        bins = lengths_or_bins
    else:
        bins = collections.Counter(int(n) // bin_width for n in lengths_or_bins)
    counts = [bins.get(i, 0) for i in range(max(bins) + 1)] if bins else []
    return {"unit": "frames", "bin_width": bin_width, "counts": counts}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The keys of ``dataset_info.json`` that readers rely on."""

    shards: list
    compression: str | None
    num_utterances: int
    hours: float
    featurizer: dict | None
    labels: list | None
    length_histogram: dict | None

    @classmethod
    def from_dict(cls, info: dict, where: str = DATASET_INFO) -> DatasetInfo:
        missing = [k for k in ("shards", "num_utterances", "hours") if k not in info]
        if missing:
            raise UserInputError(
                f"{where} lacks {missing}: not written by `qn features` (or by an older "
                "version); featurize the data again."
            )
        tokenizer = info.get("tokenizer") or {}
        return cls(
            shards=list(info["shards"]),
            compression=(info.get("compression") or None),
            num_utterances=int(info["num_utterances"]),
            hours=float(info["hours"]),
            featurizer=info.get("featurizer"),
            labels=list(tokenizer["labels"]) if "labels" in tokenizer else None,
            length_histogram=info.get("length_histogram"),
        )


def build_dataset_info(
    *,
    schema_version: int,
    created: str,
    featurizer,
    tokenizer,
    shards: Iterable[str],
    compression: str | None,
    stats: dict,
    failed_by_reason: dict,
    failures_file: str | None,
    pipeline: dict,
) -> dict:
    """The whole ``dataset_info.json`` content. ``stats`` holds ``num_utterances``, ``hours``
    and ``length_histogram`` (plus informational counts)."""
    return {
        "schema_version": schema_version,
        "created": created,
        "featurizer": featurizer.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "vocabulary_size": tokenizer.vocabulary_size,
        "blank_id": tokenizer.blank_id,
        "shards": sorted(os.path.basename(p) for p in shards),
        "compression": "GZIP" if (compression or "").lower() == "gzip" else None,
        "failures_file": failures_file,
        **stats,
        "num_failed": sum(failed_by_reason.values()),
        "failed_by_reason": failed_by_reason,
        "pipeline": pipeline,
    }


def read_dataset_info(path) -> dict:
    """The ``dataset_info.json`` of a feature folder (or the file itself).

    The pipeline writes it last, after every shard is in place, so a folder without it is an
    interrupted or still-running job: that is an error, not an empty dataset.
    """
    path = os.fspath(path)
    info_path = os.path.join(path, DATASET_INFO) if tf.io.gfile.isdir(path) else path
    if not tf.io.gfile.exists(info_path):
        raise FileNotFoundError(
            f"No {DATASET_INFO} in {path}: not a finished `qn features` output folder "
            "(an interrupted run leaves none)."
        )
    with tf.io.gfile.GFile(info_path) as f:
        return json.load(f)
