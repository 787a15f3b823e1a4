"""``.nemo`` checkpoint -> :class:`qn_keras.model_dir.ModelBundle`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from qn_keras.featurizer import ERAS, FeaturizerConfig
from qn_keras.nemo.archive import (
    CONFIG_MEMBER,
    WEIGHTS_MEMBER,
    load_state_dict,
    parse_config_yaml,
    read_nemo_members,
)
from qn_keras.nemo.config import NemoImportError, NemoModelSpec, parse_model_config, parse_version
from qn_keras.nemo.weights import FILTERBANK_KEY, WINDOW_KEY, load_nemo_weights
from qn_keras.tokenizer import CharTokenizer

# NeMo 2.5 changed the front end (spec section 2.2): frame count, STFT padding, pre-emphasis.
CURRENT_ERA_SINCE = (2, 5)


def choose_era(era: str | None, nemo_version: str | None) -> tuple[str, str]:
    """``(era, why)``: an explicit ``era`` wins; otherwise the NeMo version that saved the
    checkpoint decides, and a checkpoint without one predates NeMo 2.5 (all released
    QuartzNet and Jasper models), so it gets ``legacy``, the front end it was trained with."""
    if era is not None:
        if era not in ERAS:
            raise NemoImportError(f"era must be one of {ERAS}. Received: {era!r}")
        return era, "chosen with --era"
    version = parse_version(nemo_version)
    if version is None:
        return "legacy", (
            "default: model_config.yaml records no nemo_version, so it was saved by an early "
            "NeMo 1.x, before 2.5"
        )
    if version >= CURRENT_ERA_SINCE:
        return "current", f"default: saved by NeMo {nemo_version} (>= 2.5)"
    return "legacy", f"default: saved by NeMo {nemo_version} (< 2.5)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_keras_model(spec: NemoModelSpec, name: str = "nemo_import"):
    """An untrained :class:`qn_keras.QuartzNetCTC` with the checkpoint's architecture."""
    from qn_keras.quartznet_ctc import QuartzNetCTC

    return QuartzNetCTC(name=name, **spec.model_kwargs())


def convert(config: dict, state_dict: dict, era: str | None = None, source: str = "", extra=None):
    """A ModelBundle from a parsed ``model_config.yaml`` and a state dict of NumPy arrays in
    PyTorch layout (as :func:`qn_keras.nemo.archive.read_nemo` returns them)."""
    from qn_keras.model_dir import ModelBundle

    spec = parse_model_config(config)
    era, why = choose_era(era, spec.nemo_version)
    model = build_keras_model(spec)
    load_nemo_weights(model, spec, state_dict)
    featurizer = FeaturizerConfig(era=era, **spec.featurizer)
    filterbank = np.asarray(state_dict[FILTERBANK_KEY], np.float32)[0]
    window = np.asarray(state_dict[WINDOW_KEY], np.float32)
    metadata = {
        "source": "nemo",
        "nemo_file": source,
        "nemo_target": spec.target,
        "nemo_version": spec.nemo_version,
        "era": era,
        "era_source": why,
        "window_type": spec.window_type,
        "notes": list(spec.notes),
        # The sections the model was built from, for provenance (train_ds etc. are left out).
        "nemo_config": {
            k: config[k] for k in ("preprocessor", "encoder", "decoder") if k in config
        },
        **(extra or {}),
    }
    return ModelBundle(
        model=model,
        tokenizer=CharTokenizer(spec.labels),
        featurizer=featurizer,
        metadata=metadata,
        filterbank=filterbank,
        window=window,
    )


def import_nemo(path, era: str | None = None):
    """Reads a NeMo ``.nemo`` checkpoint (QuartzNet, Jasper: character CTC with
    ``ConvASREncoder``) into a :class:`qn_keras.model_dir.ModelBundle`.

    Args:
        path: the ``.nemo`` file (tar or tar.gz).
        era: ``"legacy"`` or ``"current"`` front end; None picks it from the NeMo version that
            saved the file (``legacy`` for NeMo < 2.5, which includes every released QuartzNet).

    Raises:
        NemoImportError: (a ValueError) naming the problem: not a ``.nemo``, a truncated file,
            an unsupported model type or setting, missing/unexpected keys or wrong shapes.
    """
    path = Path(path)
    members = read_nemo_members(path)
    config = parse_config_yaml(members[CONFIG_MEMBER])
    # Check the config before the weights are unpickled: wrong model types fail fast, and
    # without needing torch.
    parse_model_config(config)
    state_dict = load_state_dict(members.pop(WEIGHTS_MEMBER))
    return convert(
        config,
        state_dict,
        era=era,
        source=path.name,
        extra={"nemo_sha256": _sha256(path)},
    )
