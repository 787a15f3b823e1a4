"""Where a run's first weights come from (``qn train --init``): a model folder (``qn train``'s
``model/``, ``qn import-nemo``), or another run's folder or checkpoint; and copying them in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import tensorflow as tf

from qn_keras.errors import UserInputError
from qn_keras.model_dir import is_model_dir, load_model_dir
from qn_keras.training.run_files import CHECKPOINT_DIR, RUN_FILE


def checkpoint_has(directory, name: str) -> bool:
    """Whether the latest checkpoint in ``directory`` holds the top-level object ``name``."""
    latest = tf.train.latest_checkpoint(str(directory))
    if latest is None:
        return False
    return any(key.split("/")[0] == name for key, _ in tf.train.list_variables(latest))


def find_checkpoint(path: Path) -> str | None:
    """The newest checkpoint prefix in a run folder, a checkpoints folder, or a prefix."""
    for folder in (path / CHECKPOINT_DIR, path):
        if folder.is_dir():
            latest = tf.train.latest_checkpoint(str(folder))
            if latest:
                return latest
    if tf.io.gfile.exists(str(path) + ".index"):
        return str(path)
    return None


@dataclasses.dataclass
class Initialization:
    """Where the initial weights come from (``--init``)."""

    architecture: dict
    labels: tuple
    featurizer: dict
    model: tf.keras.Model | None = None
    checkpoint: str | None = None
    description: str = ""
    # An imported model's own front-end arrays (ModelBundle.filterbank / window), kept in the
    # exported model folder.
    featurizer_arrays: dict = dataclasses.field(default_factory=dict)


def load_initialization(path) -> Initialization:
    """Reads ``--init``: a model folder (``qn train`` output ``model/``, ``qn import-nemo``), or
    a training run's folder / checkpoint (its ``run.json`` gives the architecture)."""
    path = Path(path)
    if not path.exists() and not tf.io.gfile.exists(str(path) + ".index"):
        raise FileNotFoundError(f"--init: not found: {path}")
    if is_model_dir(path):
        bundle = load_model_dir(path)
        return Initialization(
            architecture=bundle.model.get_config(),
            labels=tuple(bundle.tokenizer.labels),
            featurizer=bundle.featurizer.to_dict(),
            model=bundle.model,
            description=f"model folder {path}",
            featurizer_arrays={
                k: getattr(bundle, k)
                for k in ("filterbank", "window")
                if getattr(bundle, k, None) is not None
            },
        )
    checkpoint = find_checkpoint(path)
    run_file = next(
        (p / RUN_FILE for p in (path, path.parent, path.parent.parent) if (p / RUN_FILE).is_file()),
        None,
    )
    if checkpoint is None or run_file is None:
        raise UserInputError(
            f"--init {path} is neither a model folder (model.keras + qn_model.json) nor a "
            f"training run (a {CHECKPOINT_DIR}/ folder and {RUN_FILE})."
        )
    run = json.loads(run_file.read_text())
    return Initialization(
        architecture=run["architecture"],
        labels=tuple(run["labels"]),
        featurizer=run["featurizer"],
        checkpoint=checkpoint,
        description=f"checkpoint {checkpoint}",
    )


def copy_weights(source: tf.keras.Model, target: tf.keras.Model, skip=()) -> list[str]:
    """Copies weights layer by layer (matched by name) except layers in ``skip``; returns the
    copied layer names. ValueError when a layer is missing or its weights differ in shape."""
    copied = []
    for layer in target.layers:
        if layer.name in skip or not layer.weights:
            continue
        try:
            src = source.get_layer(layer.name)
        except ValueError:
            raise UserInputError(f"The initial model has no layer {layer.name!r}.") from None
        weights = src.get_weights()
        shapes = [w.shape for w in weights]
        wanted = [tuple(w.shape) for w in layer.weights]
        if [tuple(s) for s in shapes] != wanted:
            raise UserInputError(
                f"Layer {layer.name!r}: initial weights have shapes {shapes}, the model needs "
                f"{wanted}."
            )
        layer.set_weights(weights)
        copied.append(layer.name)
    return copied
