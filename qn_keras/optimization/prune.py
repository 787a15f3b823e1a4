"""Magnitude pruning of QuartzNet models with tfmot's ``prune_low_magnitude``.

The 1x1 convolutions (pointwise, residual, the plain convs of the last blocks) and the CTC head
hold almost all of QuartzNet's weights and are pruned; depthwise kernels (a few percent of the
weights, each one a whole time filter of one channel) and BatchNorm stay dense unless asked.
Sparsity follows tfmot's ``PolynomialDecay`` from ``initial_sparsity`` to ``target_sparsity``
between ``begin_step`` and ``end_step`` of fine-tuning, with masks updated every ``frequency``
steps. The wrapper counts its own steps (every training call), so fine-tuning loops need no
callback beyond starting the counter, which :func:`prune_model` does.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from qn_keras.errors import UserInputError
from qn_keras.optimization.graph import as_functional

sparsity = tfmot.sparsity.keras
WEIGHT_ATTRS = {
    "Conv2D": "kernel",
    "DepthwiseConv2D": "depthwise_kernel",
    "Dense": "kernel",
}


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
    """Polynomial sparsity schedule over fine-tuning steps (tfmot ``PolynomialDecay``)."""

    target_sparsity: float
    end_step: int
    begin_step: int = 0
    initial_sparsity: float = 0.0
    frequency: int = 10
    power: float = 3.0

    def validate(self) -> PruneSchedule:
        if not 0.0 < self.target_sparsity < 1.0:
            raise UserInputError(
                f"target sparsity must be in (0, 1). Received: {self.target_sparsity}"
            )
        if not 0.0 <= self.initial_sparsity <= self.target_sparsity:
            raise UserInputError(
                "initial sparsity must be in [0, target sparsity]. "
                f"Received: {self.initial_sparsity}"
            )
        if self.begin_step < 0 or self.end_step <= self.begin_step:
            raise UserInputError(
                "pruning needs 0 <= begin_step < end_step. "
                f"Received: begin_step={self.begin_step}, end_step={self.end_step}"
            )
        if self.frequency < 1:
            raise UserInputError(f"pruning frequency must be >= 1. Received: {self.frequency}")
        return self

    def tfmot_schedule(self):
        return sparsity.PolynomialDecay(
            initial_sparsity=self.initial_sparsity,
            final_sparsity=self.target_sparsity,
            begin_step=self.begin_step,
            end_step=self.end_step,
            power=self.power,
            frequency=self.frequency,
        )


def is_prunable(layer, include_depthwise: bool = False) -> bool:
    kind = type(layer).__name__
    if kind == "DepthwiseConv2D":
        return include_depthwise
    return kind in ("Conv2D", "Dense")


def prune_model(model: tf.keras.Model, schedule: PruneSchedule, include_depthwise: bool = False):
    """A copy of ``model`` with the prunable layers wrapped in ``PruneLowMagnitude``.

    Weights are copied; the wrappers' step counters start at 0, so every training call of the
    returned model advances the schedule (what tfmot's ``UpdatePruningStep`` callback would
    otherwise have to do in a Keras ``fit``).
    """
    schedule.validate()
    functional = as_functional(model)

    def wrap(layer):
        if is_prunable(layer, include_depthwise):
            return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule.tfmot_schedule())
        return layer.__class__.from_config(layer.get_config())

    with sparsity.prune_scope():
        pruned = tf.keras.models.clone_model(functional, clone_function=wrap)
    for layer in functional.layers:
        if layer.weights:
            target = pruned.get_layer(_wrapped_name(pruned, layer.name))
            _set_inner_weights(target, layer.get_weights())
    start_pruning_steps(pruned)
    return pruned


def _wrapped_name(model, name):
    for candidate in (name, f"prune_low_magnitude_{name}"):
        try:
            model.get_layer(candidate)
            return candidate
        except ValueError:
            continue
    raise UserInputError(f"{model.name} has no layer {name!r}.")


def _set_inner_weights(layer, weights):
    inner = getattr(layer, "layer", layer)
    inner.set_weights(weights)


def _wrappers(model):
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    return [layer for layer in model.layers if isinstance(layer, pruning_wrapper.PruneLowMagnitude)]


def start_pruning_steps(model) -> None:
    """Sets every wrapper's step counter from -1 (never trained) to 0."""
    for layer in _wrappers(model):
        if int(layer.pruning_step.numpy()) < 0:
            layer.pruning_step.assign(0)


def apply_masks(model) -> None:
    """weights *= mask in every wrapper: the last optimizer update also moved pruned weights."""
    for layer in _wrappers(model):
        layer.pruning_obj.weight_mask_op()


def strip(model: tf.keras.Model, like: tf.keras.Model | None = None) -> tf.keras.Model:
    """Masks applied, wrappers removed.

    With ``like`` (a model of the original architecture, e.g. a fresh ``QuartzNetCTC``), the
    stripped weights are copied into it by layer name and it is returned: the result is then
    of the original class again (serializable, countable by ``qn_keras.summary``).
    """
    apply_masks(model)
    stripped = sparsity.strip_pruning(model)
    if like is None:
        return stripped
    for layer in like.layers:
        if layer.weights:
            layer.set_weights(stripped.get_layer(layer.name).get_weights())
    return like


def layer_sparsity(model: tf.keras.Model, include_depthwise: bool = False) -> list[dict]:
    """Per weighted conv / dense layer: weights, zeros, the fraction of zeros, and whether the
    layer is one :func:`prune_model` prunes."""
    out = []
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        attr = WEIGHT_ATTRS.get(type(inner).__name__)
        if attr is None:
            continue
        value = getattr(inner, attr).numpy()
        zeros = int(np.count_nonzero(value == 0))
        out.append(
            {
                "layer": inner.name,
                "kind": type(inner).__name__,
                "weights": int(value.size),
                "zeros": zeros,
                "sparsity": zeros / value.size if value.size else 0.0,
                "pruned": is_prunable(inner, include_depthwise),
            }
        )
    return out


def overall_sparsity(rows: list[dict], kinds=None) -> float:
    """Fraction of zeros over the layers of ``rows`` (optionally only some layer kinds)."""
    picked = [r for r in rows if kinds is None or r["kind"] in kinds]
    total = sum(r["weights"] for r in picked)
    return sum(r["zeros"] for r in picked) / total if total else 0.0


def gzip_size(path) -> int:
    """Bytes of ``path`` (a file, or every file of a folder, in sorted order) after gzip -9."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise UserInputError(f"gzip_size: nothing to compress at {path}")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as gz:
        for f in files:
            with open(f, "rb") as src:
                while chunk := src.read(1 << 20):
                    gz.write(chunk)
    return buffer.tell()


def file_size(path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(os.path.getsize(p) for p in path.rglob("*") if p.is_file())
    return os.path.getsize(path)
