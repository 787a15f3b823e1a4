"""What a run trains, decided before anything is built: a new run's architecture, labels and
front end (from the config, or from ``--init``), or a killed run's (from its ``run.json``,
which must have been written with the same config up to how long to go on).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras import files
from qn_keras.errors import UserInputError
from qn_keras.tokenizer import CharTokenizer
from qn_keras.training.config import ConfigError, TrainConfig, architecture_from_config
from qn_keras.training.initialization import Initialization, load_initialization
from qn_keras.training.run_files import CHECKPOINT_DIR, FEATURIZER_ARRAYS_FILE, RUN_FILE

# Config keys that may change between a killed run and its restart (how long to go on).
RESTART_KEYS = {
    "training": (
        "epochs",
        "max_steps",
        "max_minutes",
        "early_stopping_patience",
        "early_stopping_min_delta",
        "validate_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "log_every_steps",
    )
}


@dataclasses.dataclass
class RunSpec:
    architecture: dict  # QuartzNetCTC arguments without vocabulary_size
    labels: tuple
    featurizer: dict
    init: Initialization | None  # the initial weights of a new run; None when resuming
    resuming: bool
    featurizer_arrays: dict  # an imported model's own filterbank/window, kept across resumes


def restart_view(config: dict) -> dict:
    view = json.loads(json.dumps(config))
    for section, keys in RESTART_KEYS.items():
        for key in keys:
            view.get(section, {}).pop(key, None)
    return view


def resolve_run(config: TrainConfig, out_dir: Path, init_from, *, is_chief: bool, say) -> RunSpec:
    """The run in ``out_dir``: resumed when it holds checkpoints, else new (from ``init_from``
    if given). ConfigError when the folder holds a run with another config."""
    run_path = out_dir / RUN_FILE
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    resuming = tf.train.latest_checkpoint(str(checkpoint_dir)) is not None
    previous = json.loads(run_path.read_text()) if run_path.is_file() else None
    if resuming and previous is None:
        raise UserInputError(
            f"{checkpoint_dir} has checkpoints but {run_path} is missing; use a new --out."
        )
    if resuming:
        if restart_view(previous["config"]) != restart_view(config.to_dict()):
            raise ConfigError(
                f"{out_dir} holds a run with a different config; restart it with the "
                "same config (only run-length settings may change) or use a new --out."
            )
        if init_from:
            say(f"Resuming {out_dir}: --init {init_from} is not used again.")
        return RunSpec(
            architecture=previous["architecture"],
            labels=tuple(previous["labels"]),
            featurizer=previous["featurizer"],
            init=None,
            resuming=True,
            featurizer_arrays=_saved_featurizer_arrays(out_dir),
        )
    init = load_initialization(init_from) if init_from else None
    architecture, labels, featurizer = _new_model_setup(config, init)
    arrays = dict(init.featurizer_arrays) if init is not None else {}
    if is_chief:
        path = out_dir / FEATURIZER_ARRAYS_FILE
        if arrays:
            with files.atomic_path(path) as tmp:
                np.savez(tmp, **arrays)
        elif path.exists():
            path.unlink()
    return RunSpec(architecture, labels, featurizer, init, False, arrays)


def write_run_file(out_dir: Path, config: TrainConfig, run: RunSpec) -> None:
    files.write_json(
        out_dir / RUN_FILE,
        {
            "config": config.to_dict(),
            "architecture": run.architecture,
            "labels": list(run.labels),
            "featurizer": run.featurizer,
        },
    )


def _saved_featurizer_arrays(out_dir: Path) -> dict:
    path = out_dir / FEATURIZER_ARRAYS_FILE
    if path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    return {}


def _new_model_setup(config: TrainConfig, init: Initialization | None):
    """(architecture, labels, front end): the config's where it sets them, else ``--init``'s."""
    if init is not None:
        architecture = dict(init.architecture)
        architecture.pop("vocabulary_size", None)
    else:
        architecture = architecture_from_config(config.model)
    if config.labels is not None:
        labels = tuple(config.tokenizer().labels)
    elif init is not None:
        labels = init.labels
    else:
        labels = tuple(CharTokenizer().labels)
    if config.featurizer or init is None:
        featurizer = config.featurizer_config().to_dict()
    else:
        featurizer = dict(init.featurizer)
    return architecture, labels, featurizer
