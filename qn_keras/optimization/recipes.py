"""The optimization jobs behind ``qn optimize``: QAT, pruning, post-training quantization.

Each job reads a model folder (trained, imported from NeMo, or pruned), fine-tunes with the
project's trainer where it trains (through its ``model_fn`` hook, so the recipe, checkpoints and
resuming are the trainer's), and writes ``OUT/model/``: a model folder (``model.keras``,
``qn_model.json`` with an ``optimization`` entry, the serving ``saved_model/``) plus
``model.tflite``. ``OUT/finetune/`` holds the trainer's run (checkpoints, report, curves).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qn_keras.errors import UserInputError
from qn_keras.model_dir import ModelBundle, load_model_dir, save_model_dir
from qn_keras.optimization import prune as prune_lib
from qn_keras.optimization import tflite as tflite_lib
from qn_keras.optimization.evaluate import keras_logprobs, load_features, score, transcribe
from qn_keras.optimization.quantize import get_scheme, quantize_model

OPTIMIZATION_KEY = "optimization"
# What loading one of these folders needs imported (tfmot's wrappers; see qn_keras.model_dir).
REQUIRES = ["qn_keras.optimization"]
MODEL_SUBDIR = "model"
FINETUNE_SUBDIR = "finetune"
TFLITE_FILE = "model.tflite"
FINETUNE_LEARNING_RATE = 0.001
# A long horizon in epochs: fine-tuning runs stop at max_steps.
MANY_EPOCHS = 1_000_000


def finetune_config(config=None, *, steps: int, learning_rate: float | None = None, **dotted):
    """The fine-tuning recipe: ``config`` (a TrainConfig or YAML path; default: the trainer's
    NeMo recipe at learning rate 0.001) run for ``steps`` steps, cosine over those steps."""
    from qn_keras.training.config import TrainConfig, load_config

    if steps < 1:
        raise UserInputError(f"--steps must be >= 1. Received: {steps}")
    if config is None:
        base = TrainConfig()
        learning_rate = learning_rate or FINETUNE_LEARNING_RATE
    elif isinstance(config, TrainConfig):
        base = config
    else:
        base = load_config(config)
    overrides = {
        "training.max_steps": steps,
        "training.epochs": MANY_EPOCHS,
        "schedule.max_steps": None,
        **dotted,
    }
    if learning_rate is not None:
        overrides["optimizer.learning_rate"] = float(learning_rate)
    return base.replace(**overrides)


def load_float_bundle(model_dir) -> ModelBundle:
    """A model folder holding a float QuartzNetCTC (not an already quantized one)."""
    bundle = load_model_dir(model_dir)
    info = bundle.metadata.get(OPTIMIZATION_KEY, {})
    if info.get("kind") == "qat" or "stackwise_filters" not in bundle.model.get_config():
        raise UserInputError(
            f"{model_dir} holds a quantized model; start from a float model folder (trained, "
            "imported with `qn import-nemo`, or pruned with `qn optimize prune`)."
        )
    return bundle


def save_optimized(out_dir, bundle: ModelBundle, tflite_blob: bytes | None) -> Path:
    """Writes ``out_dir`` (a model folder with the serving SavedModel) and its ``model.tflite``."""
    path = save_model_dir(out_dir, bundle, serving=True)
    if tflite_blob is not None:
        tflite_lib.write_tflite(path / TFLITE_FILE, tflite_blob)
    return path


def _info(kind: str, name: str, precision: str, source, architecture: dict, **extra) -> dict:
    return {
        "kind": kind,
        "name": name,
        "precision": precision,
        "source": str(source),
        "architecture": architecture,
        **extra,
    }


def _featurizer_features(bundle):
    return bundle.model.inputs[0].shape[-1]


def run_qat(
    model_dir,
    train_data,
    val_data,
    out_dir,
    *,
    scheme: str = "int8_per_channel",
    steps: int = 1000,
    config=None,
    learning_rate: float | None = None,
    name: str | None = None,
    progress: bool = True,
    strategy=None,
) -> Path:
    """Quantization-aware fine-tuning of a float model folder; returns ``OUT/model``.

    A pruned input (``qn optimize prune`` output) keeps its zeros: the weight quantizers
    multiply by the sparsity masks (pruning-preserving QAT).
    """
    from qn_keras.training.trainer import Trainer

    quant_scheme = get_scheme(scheme)
    bundle = load_float_bundle(model_dir)
    source_info = bundle.metadata.get(OPTIMIZATION_KEY, {})
    preserve_sparsity = source_info.get("kind") == "pruned"
    architecture = bundle.model.get_config()
    out_dir = Path(out_dir)
    cfg = finetune_config(config, steps=steps, learning_rate=learning_rate)

    def model_fn(model):
        return quantize_model(model, quant_scheme, preserve_sparsity=preserve_sparsity)

    trainer = Trainer(
        cfg,
        out_dir / FINETUNE_SUBDIR,
        train_data,
        val_data,
        init_from=model_dir,
        model_fn=model_fn,
        progress=progress,
        export_serving=False,
        strategy=strategy,
    )
    result = trainer.fit(max_steps=steps)
    trained = load_model_dir(result.model_dir)
    blob = tflite_lib.convert(trained.model, "qat", num_features=_featurizer_features(trained))
    precision = "int4" if quant_scheme.weight_bits == 4 else "int8"
    prefix = f"{source_info['name']}+" if preserve_sparsity and source_info.get("name") else ""
    info = _info(
        "qat",
        name or f"{prefix}{scheme}",
        precision,
        model_dir,
        architecture,
        scheme=scheme,
        weight_bits=quant_scheme.weight_bits,
        edge_weight_bits=quant_scheme.edge_bits,
        per_channel=quant_scheme.per_channel,
        preserve_sparsity=preserve_sparsity,
        target_sparsity=source_info.get("target_sparsity"),
        steps=result.steps,
        best=result.best,
    )
    metadata = {**_carried(bundle.metadata), OPTIMIZATION_KEY: info, "requires": REQUIRES}
    out = dataclasses.replace(bundle, model=trained.model, metadata=metadata)
    return save_optimized(out_dir / MODEL_SUBDIR, out, blob)


def run_prune(
    model_dir,
    train_data,
    val_data,
    out_dir,
    *,
    target_sparsity: float,
    steps: int = 1000,
    end_fraction: float = 0.7,
    frequency: int | None = None,
    include_depthwise: bool = False,
    config=None,
    learning_rate: float | None = None,
    name: str | None = None,
    progress: bool = True,
    strategy=None,
) -> Path:
    """Magnitude pruning during fine-tuning, stripped; returns ``OUT/model`` (float TFLite).

    Sparsity ramps up over the first ``end_fraction`` of the steps and the rest fine-tunes at
    the target. The exported model is the last one (the trainer's best-by-WER could be one
    from before the target sparsity was reached), evaluated on ``val_data`` afterwards.
    """
    from qn_keras.quartznet_ctc import QuartzNetCTC
    from qn_keras.training.trainer import Trainer

    bundle = load_float_bundle(model_dir)
    architecture = bundle.model.get_config()
    out_dir = Path(out_dir)
    end_step = max(1, int(round(steps * end_fraction)))
    schedule = prune_lib.PruneSchedule(
        target_sparsity=target_sparsity,
        end_step=end_step,
        frequency=frequency or max(1, end_step // 20),
    ).validate()
    cfg = finetune_config(config, steps=steps, learning_rate=learning_rate)

    def model_fn(model):
        return prune_lib.prune_model(model, schedule, include_depthwise=include_depthwise)

    trainer = Trainer(
        cfg,
        out_dir / FINETUNE_SUBDIR,
        train_data,
        None,
        init_from=model_dir,
        model_fn=model_fn,
        progress=progress,
        export_serving=False,
        strategy=strategy,
    )
    result = trainer.fit(max_steps=steps)
    wrapped = load_model_dir(result.model_dir).model
    stripped = prune_lib.strip(wrapped, like=QuartzNetCTC.from_config(dict(architecture)))
    rows = prune_lib.layer_sparsity(stripped, include_depthwise=include_depthwise)
    metrics = None
    if val_data is not None:
        utts = load_features(val_data, bundle, out_dir / FINETUNE_SUBDIR / "cache")
        metrics = score(utts, transcribe(keras_logprobs(stripped), utts, bundle.tokenizer))
    blob = tflite_lib.convert(stripped, "float32", num_features=_featurizer_features(bundle))
    info = _info(
        "pruned",
        name or f"pruned{int(round(target_sparsity * 100))}",
        "float32",
        model_dir,
        architecture,
        target_sparsity=target_sparsity,
        schedule={
            "begin_step": schedule.begin_step,
            "end_step": schedule.end_step,
            "frequency": schedule.frequency,
            "power": schedule.power,
        },
        include_depthwise=include_depthwise,
        pruned_sparsity=prune_lib.overall_sparsity([r for r in rows if r["pruned"]]),
        layer_sparsity=rows,
        steps=result.steps,
        val=metrics,
    )
    metadata = {**_carried(bundle.metadata), OPTIMIZATION_KEY: info, "requires": REQUIRES}
    out = dataclasses.replace(bundle, model=stripped, metadata=metadata)
    return save_optimized(out_dir / MODEL_SUBDIR, out, blob)


PTQ_PRECISIONS = {"float32": "float32", "float16": "float16", "dynamic": "dynamic", "int8": "int8"}


def run_ptq(
    model_dir,
    out_dir,
    *,
    mode: str = "int8",
    representative_data=None,
    samples: int = 100,
    name: str | None = None,
) -> Path:
    """Post-training conversion of a float (or pruned) model folder; returns ``OUT/model``.

    ``int8`` is full-integer quantization calibrated on ``samples`` utterances of
    ``representative_data`` (features in, so the log-mel front end stays float); ``float16``
    stores float16 weights; ``float32`` is the float baseline; ``dynamic`` int8 weights only.
    """
    if mode not in PTQ_PRECISIONS:
        raise UserInputError(
            f"--mode must be one of {', '.join(PTQ_PRECISIONS)}. Received: {mode!r}"
        )
    bundle = load_float_bundle(model_dir)
    out_dir = Path(out_dir)
    source_info = bundle.metadata.get(OPTIMIZATION_KEY, {})
    representative = None
    if mode == "int8":
        if representative_data is None:
            raise UserInputError(
                "int8 post-training quantization needs --train (representative data)."
            )
        if samples < 1:
            raise UserInputError(f"--samples must be >= 1. Received: {samples}")
        utts = load_features(representative_data, bundle, out_dir / "cache", limit=samples)
        representative = [u.features for u in utts]
    blob = tflite_lib.convert(
        bundle.model,
        mode,
        num_features=_featurizer_features(bundle),
        representative_features=representative,
    )
    default_name = mode if mode != "int8" else "int8_ptq"
    if source_info.get("name") and source_info.get("kind") == "pruned" and mode != "float32":
        default_name = f"{source_info['name']}+{default_name}"
    elif source_info.get("name") and mode == "float32":
        default_name = source_info["name"]
    info = _info(
        "ptq",
        name or default_name,
        PTQ_PRECISIONS[mode],
        model_dir,
        bundle.model.get_config(),
        mode=mode,
        representative_samples=len(representative) if representative else None,
        parent=source_info or None,
    )
    metadata = {**_carried(bundle.metadata), OPTIMIZATION_KEY: info, "requires": REQUIRES}
    out = dataclasses.replace(bundle, model=bundle.model, metadata=metadata)
    return save_optimized(out_dir / MODEL_SUBDIR, out, blob)


def _carried(metadata: dict) -> dict:
    """Source metadata worth keeping (training provenance), without a previous optimization."""
    return {k: v for k, v in metadata.items() if k not in (OPTIMIZATION_KEY, "requires")}


def resolve_model_dir(path) -> Path:
    """``OUT`` of a ``qn optimize`` job or its ``OUT/model``; also any model folder."""
    from qn_keras.model_dir import is_model_dir

    path = Path(path)
    if is_model_dir(path / MODEL_SUBDIR):
        return path / MODEL_SUBDIR
    if is_model_dir(path):
        return path
    raise UserInputError(
        f"{path} is not a model folder or the output of a `qn optimize` command "
        f"(expected {path / MODEL_SUBDIR}/qn_model.json)."
    )


def read_info(model_dir) -> dict:
    meta = json.loads((Path(model_dir) / "qn_model.json").read_text())
    return meta.get("metadata", {}).get(OPTIMIZATION_KEY) or {}
