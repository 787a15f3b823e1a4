"""One interface over the two places a model lives: a model folder (``qn train``,
``qn import-nemo``) and an exported TF Serving version folder (``qn export``).

Both give the same three functions, so batch and long-audio transcription run on either:
``serving_default(waveform, lengths)``, ``log_mel(waveform, lengths)`` and
``encode(features, feature_lengths)`` (see :class:`qn_keras.inference.SpeechRecognizer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from qn_keras.errors import UserInputError
from qn_keras.featurizer import FeaturizerConfig
from qn_keras.inference import SpeechRecognizer
from qn_keras.model_dir import is_model_dir, load_model_dir
from qn_keras.tokenizer import CharTokenizer


@dataclasses.dataclass
class Recognizer:
    """The functions and settings transcription needs, wherever the model came from."""

    serving_default: Callable
    log_mel: Callable
    encode: Callable
    tokenizer: CharTokenizer
    featurizer: FeaturizerConfig
    stride: int
    source: str
    # The tf.Module or loaded SavedModel the functions belong to: bound tf.functions hold only
    # a weak reference to it.
    owner: object = None
    # The model folder's bundle, or an export's qn_export.json (streaming reads them).
    bundle: object = None
    export_meta: dict | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.tokenizer.labels

    @property
    def sample_rate(self) -> int:
        return self.featurizer.sample_rate

    @property
    def frame_seconds(self) -> float:
        """Duration of one output frame (20 ms for QuartzNet)."""
        return self.stride * self.featurizer.hop_length / self.featurizer.sample_rate


def from_bundle(bundle, source: str = "<in memory>") -> Recognizer:
    module = SpeechRecognizer(bundle)
    return Recognizer(
        serving_default=module.serving_default,
        log_mel=module.log_mel,
        encode=module.encode,
        tokenizer=bundle.tokenizer,
        featurizer=bundle.featurizer,
        stride=module.stride,
        source=source,
        owner=module,
        bundle=bundle,
    )


def _from_export(version_dir: Path) -> Recognizer:
    from serving.layout import METADATA_FILE, read_export_metadata

    meta = read_export_metadata(version_dir)
    if meta is None:
        raise UserInputError(
            f"{version_dir} has a saved_model.pb but no assets.extra/{METADATA_FILE}; "
            "it was not written by `qn export`."
        )
    featurizer = FeaturizerConfig.from_dict(meta["featurizer"])
    loaded = tf.saved_model.load(str(version_dir))
    stride = round(meta["output_frame_seconds"] * featurizer.sample_rate / featurizer.hop_length)
    return Recognizer(
        serving_default=loaded.serving_default,
        log_mel=loaded.log_mel,
        encode=loaded.encode,
        tokenizer=CharTokenizer(meta["labels"]),
        featurizer=featurizer,
        stride=int(stride),
        source=str(version_dir),
        owner=loaded,
        export_meta=meta,
    )


def load_recognizer(path) -> Recognizer:
    """A model folder, an exported version folder ``BASE/NAME/N``, or ``BASE/NAME`` (its
    latest version). ValueError saying what was expected otherwise."""
    from serving.layout import existing_versions, latest_version_dir

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Model not found: {path}")
    if is_model_dir(path):
        return from_bundle(load_model_dir(path), source=str(path))
    if (path / "saved_model.pb").is_file():
        return _from_export(path)
    if existing_versions(path):
        return _from_export(latest_version_dir(path))
    raise UserInputError(
        f"{path} is neither a model folder (model.keras + qn_model.json, from `qn train` or "
        "`qn import-nemo`) nor an exported model (BASE/NAME or BASE/NAME/VERSION from "
        "`qn export`)."
    )
