"""The model folder every command reads and writes: trained, fine-tuned or imported models.

Layout::

    DIR/
      model.keras      Keras QuartzNetCTC, no optimizer state
      qn_model.json    {"format": "qn-keras-model", "version": 1, "labels": [...],
                        "featurizer": {...FeaturizerConfig...}, "metadata": {...}}
      saved_model/     optional: serving SavedModel (waveform in, text out)
      featurizer_filterbank.npy, featurizer_window.npy
                       optional: the mel filterbank and window to use instead of computed
                       ones (imported NeMo models carry their checkpoint's own buffers)

Writes go to a temporary sibling folder that is renamed into place at the end, so an
interrupted write never leaves a half-written model under the final name.

Layering: this module sits above the model and the in-graph recognizer (it writes the serving
SavedModel with :func:`qn_keras.inference.save_serving_model`) and below everything that makes
model folders (training, optimization, tuning, NeMo import). A folder whose model needs more
Keras classes than the core ones (tfmot's wrappers, say) names the modules that register them
in ``metadata["requires"]``; loading imports those (``qn_keras.*`` only), so this module never
imports the packages above it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras import files
from qn_keras.errors import UserInputError
from qn_keras.featurizer import FeaturizerConfig, LogMelSpectrogram
from qn_keras.inference import save_serving_model
from qn_keras.tokenizer import CharTokenizer

FORMAT = "qn-keras-model"
VERSION = 1
KERAS_FILE = "model.keras"
META_FILE = "qn_model.json"
SAVED_MODEL_DIR = "saved_model"
# ModelBundle field -> file holding it (absent from older folders: computed defaults apply)
FEATURIZER_ARRAYS = {"filterbank": "featurizer_filterbank.npy", "window": "featurizer_window.npy"}


@dataclasses.dataclass
class ModelBundle:
    """A Keras model with the tokenizer and featurizer settings it was trained with."""

    model: tf.keras.Model
    tokenizer: CharTokenizer
    featurizer: FeaturizerConfig
    metadata: dict = dataclasses.field(default_factory=dict)
    # Optional front-end arrays replacing the computed slaney filterbank ``(num_mels, bins)``
    # and symmetric Hann window ``(win_length,)``: a NeMo checkpoint's own ``fb``/``window``.
    filterbank: np.ndarray | None = None
    window: np.ndarray | None = None

    def featurizer_layer(self, **kwargs) -> LogMelSpectrogram:
        """The model's front end; every consumer should build it here, not from ``featurizer``
        alone, so that imported filterbanks and windows are used."""
        return LogMelSpectrogram(
            **self.featurizer.to_dict(), filterbank=self.filterbank, window=self.window, **kwargs
        )


def is_model_dir(path) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / KERAS_FILE).is_file()


def save_model_dir(path, bundle: ModelBundle, *, serving: bool = True, overwrite: bool = True):
    """Writes ``bundle`` to ``path`` atomically; with ``serving`` also the serving SavedModel."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another --out or remove it.")
    with files.atomic_directory(path, replace=True) as tmp:
        # A clone without compile state: NovoGrad's scalar slots do not reload (known trap).
        model = bundle.model
        if model.optimizer is not None:
            model = tf.keras.models.clone_model(model)
            model.set_weights(bundle.model.get_weights())
        model.save(tmp / KERAS_FILE)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "labels": list(bundle.tokenizer.labels),
            "featurizer": bundle.featurizer.to_dict(),
            "metadata": bundle.metadata,
        }
        arrays = {}
        for field, filename in FEATURIZER_ARRAYS.items():
            value = getattr(bundle, field)
            if value is not None:
                np.save(tmp / filename, np.asarray(value, dtype=np.float32))
                arrays[field] = filename
        if arrays:
            meta["featurizer_arrays"] = arrays
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        if serving:
            save_serving_model(tmp / SAVED_MODEL_DIR, bundle)
    return path


def required_modules(metadata: dict) -> list[str]:
    """The modules a folder's model needs imported before it deserializes."""
    modules = list(metadata.get("requires", []))
    if metadata.get("optimization") and not modules:  # folders written before "requires"
        modules = ["qn_keras.optimization"]
    bad = [m for m in modules if not str(m).startswith("qn_keras.")]
    if bad:
        raise UserInputError(f"The model folder requires modules outside qn_keras: {bad}")
    return modules


def load_model_dir(path, compile: bool = False) -> ModelBundle:
    """Loads a model folder; ValueError naming what is missing if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Model folder not found: {path}")
    if not is_model_dir(path):
        raise UserInputError(
            f"{path} is not a qn-keras model folder (needs {KERAS_FILE} and {META_FILE}); "
            "make one with `qn train` or `qn import-nemo`."
        )
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise UserInputError(f"{path / META_FILE} is not a {FORMAT} file.")
    import qn_keras.quartznet_ctc  # noqa: F401  (registers the custom layers before deserializing)

    for module in required_modules(meta.get("metadata", {})):
        importlib.import_module(module)  # registers the Keras classes the model needs

    model = tf.keras.models.load_model(path / KERAS_FILE, compile=compile)
    arrays = {}
    for field, filename in meta.get("featurizer_arrays", {}).items():
        if FEATURIZER_ARRAYS.get(field) != filename or not (path / filename).is_file():
            raise UserInputError(
                f"{path / META_FILE} names a missing featurizer array {filename!r}."
            )
        arrays[field] = np.load(path / filename)
    return ModelBundle(
        model=model,
        tokenizer=CharTokenizer(meta["labels"]),
        featurizer=FeaturizerConfig.from_dict(meta["featurizer"]),
        metadata=meta.get("metadata", {}),
        **arrays,
    )
