"""Estimating a model's feature prior (:class:`FeaturePrior`) from audio: from the files a
feature folder's records were made from (``qn train`` does this when it writes a model), or
from files, folders and manifests a user names (``qn model prior``)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from qn_keras.audio import AUDIO_EXTENSIONS, AudioError, decode_audio
from qn_keras.data.manifest import MANIFEST_EXTENSIONS
from qn_keras.errors import UserInputError
from qn_keras.streaming.normalization import FeaturePrior, estimate_prior

log = logging.getLogger(__name__)
DEFAULT_FILES = 200


def prior_from_audio(
    paths: Iterable[str | Path],
    featurizer,
    limit: int = DEFAULT_FILES,
    progress: Callable[[int], None] | None = None,
) -> FeaturePrior:
    """The prior of up to ``limit`` audio files, featurized with ``featurizer`` (the model's
    :class:`~qn_keras.featurizer.LogMelSpectrogram`). Unreadable or too-short files are
    skipped (and logged); none readable is a UserInputError."""
    import tensorflow as tf

    cfg = featurizer.config
    function = tf.function(
        lambda w: featurizer.log_mel(w[None], tf.shape(w)[:1]),
        input_signature=[tf.TensorSpec([None], tf.float32)],
    )

    def log_mels():
        used = 0
        for path in paths:
            if used >= limit:
                return
            try:
                waveform = decode_audio(path, cfg.sample_rate)
            except (AudioError, OSError, RuntimeError) as e:
                log.warning("feature prior: skipping %s: %s", path, e)
                continue
            if len(waveform) < cfg.min_samples:
                continue
            log_mel, length = function(tf.constant(waveform))
            used += 1
            if progress:
                progress(used)
            yield log_mel[0, : int(length[0])].numpy()

    return estimate_prior(log_mels())


def audio_paths(inputs: Sequence[str | Path]) -> list[str]:
    """Audio files named by files, folders (searched recursively) and manifests."""
    from qn_keras.data.manifest import load_utterances

    out: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        elif path.suffix.lower() in MANIFEST_EXTENSIONS and path.is_file():
            out += [u.audio_filepath for u in load_utterances(path)]
        elif path.is_file():
            out.append(str(path))
        else:
            raise FileNotFoundError(f"Not found: {path}")
    return list(dict.fromkeys(out))


def record_sources(files: Sequence[str], compression: str | None, limit: int) -> list[str]:
    """Distinct source audio paths of TFRecords (the schema's ``source``), up to ``limit``,
    spread over the files."""
    import tensorflow as tf

    from qn_keras.data import schema

    spec = {schema.SOURCE: tf.io.FixedLenFeature([], tf.string, default_value="")}
    per_file = max(1, -(-limit * 4 // max(1, len(files))))  # copies share a source
    out: dict[str, None] = {}
    for name in files:
        dataset = tf.data.TFRecordDataset(name, compression_type=compression or "")
        for raw in dataset.take(per_file):
            source = tf.io.parse_single_example(raw, spec)[schema.SOURCE].numpy().decode()
            if source:
                out.setdefault(source)
    return list(out)[:limit]


def _source_audio(data_path, limit: int) -> list:
    """Audio files behind a manifest, a ``qn features`` folder or TFRecord file(s)."""
    from qn_keras.data import reader

    if isinstance(data_path, str | Path) and Path(data_path).suffix.lower() in MANIFEST_EXTENSIONS:
        return audio_paths([data_path])[: limit * 2]
    files, compression, _ = reader._shard_files(data_path)
    return record_sources(files, compression, limit)


def training_prior(data_path, featurizer, limit: int = DEFAULT_FILES) -> FeaturePrior:
    """The prior of a training set: a ``qn features`` folder or TFRecord file(s) (through
    their records' source audio), or a manifest."""
    if isinstance(data_path, list | tuple):
        # Several parts (qn train --train A --train B, or shard files): files from each in turn.
        share = max(1, -(-2 * limit // max(len(data_path), 1)))  # slack for unreadable files
        per_part = [_source_audio(p, share) for p in data_path]
        sources = [s for group in itertools.zip_longest(*per_part) for s in group if s]
    else:
        sources = _source_audio(data_path, limit)
    if not sources:
        raise UserInputError("The training records name no source audio to estimate a prior.")
    return prior_from_audio(sources, featurizer, limit)
