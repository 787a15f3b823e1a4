"""NeMo state-dict names and PyTorch layouts to qn_keras layers and Keras layouts.

The table is derived, not hard-coded: :func:`weight_plan` replays how NeMo's ``JasperBlock``
fills its ``mconv`` module list (spec section 1.2) — depthwise + pointwise (separable) or one
conv, BatchNorm, a ``GroupShuffle`` when grouped, ReLU + Dropout between sub-blocks,
``SqueezeExcite`` last — so the module indices are right for any repeat, groups and SE setting.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qn_keras.choices import HEAD_LAYER
from qn_keras.nemo.config import NemoImportError, NemoModelSpec

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")
FILTERBANK_KEY = "preprocessor.featurizer.fb"
WINDOW_KEY = "preprocessor.featurizer.window"
DECODER_PREFIX = "decoder.decoder_layers.0"
# Present in every BatchNorm of a saved state dict, meaningless for inference.
OPTIONAL_SUFFIX = ".num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    """One Keras layer (or sublayer) and the NeMo tensors that fill it, in weight order."""

    layer: str
    kind: str  # "depthwise" | "conv" | "bn" | "se_squeeze" | "se_excite" | "dense"
    keys: tuple
    shapes: tuple  # PyTorch shapes, one per key


def _conv_key(prefix: str, conv_mask: bool) -> str:
    # MaskedConv1d wraps nn.Conv1d as `.conv`; without conv_mask NeMo uses nn.Conv1d itself.
    return f"{prefix}.conv.weight" if conv_mask else f"{prefix}.weight"


def _bn_entry(layer, prefix, channels):
    keys = tuple(f"{prefix}.{s}" for s in BN_SUFFIXES)
    return WeightEntry(layer, "bn", keys, ((channels,),) * 4)


def weight_plan(spec: NemoModelSpec) -> list[WeightEntry]:
    """Every Keras weight of the model built from ``spec`` and the NeMo tensors it comes from."""
    plan = []
    mask = spec.conv_mask
    for i, block in enumerate(spec.blocks):
        base = f"encoder.encoder.{i}"
        index = 0  # position in NeMo's `mconv` ModuleList
        channels = block.in_channels
        k = block.kernel_size
        for j in range(block.repeat):
            name = f"block_{i}_sub_{j}"
            if block.separable:
                plan.append(
                    WeightEntry(
                        f"{name}_depthwise",
                        "depthwise",
                        (_conv_key(f"{base}.mconv.{index}", mask),),
                        ((channels, 1, k),),
                    )
                )
                plan.append(
                    WeightEntry(
                        f"{name}_pointwise",
                        "conv",
                        (_conv_key(f"{base}.mconv.{index + 1}", mask),),
                        ((block.filters, channels // block.groups, 1),),
                    )
                )
                index += 2
            else:
                plan.append(
                    WeightEntry(
                        f"{name}_conv",
                        "conv",
                        (_conv_key(f"{base}.mconv.{index}", mask),),
                        ((block.filters, channels // block.groups, k),),
                    )
                )
                index += 1
            plan.append(_bn_entry(f"{name}_bn", f"{base}.mconv.{index}", block.filters))
            index += 1
            if block.groups > 1:
                index += 1  # GroupShuffle: no parameters
            if j < block.repeat - 1:
                index += 2  # activation, Dropout
            channels = block.filters
        if block.se:
            hidden = block.filters // block.se_reduction_ratio
            prefix = f"{base}.mconv.{index}.fc"
            plan.append(
                WeightEntry(
                    f"block_{i}_se/squeeze",
                    "se_squeeze",
                    (f"{prefix}.0.weight",),
                    ((hidden, block.filters),),
                )
            )
            plan.append(
                WeightEntry(
                    f"block_{i}_se/excite",
                    "se_excite",
                    (f"{prefix}.2.weight",),
                    ((block.filters, hidden),),
                )
            )
        for p, pane in enumerate(block.residual_panes):
            prefix = f"{base}.res.{p}"
            plan.append(
                WeightEntry(
                    f"block_{i}_res_{p}_conv",
                    "conv",
                    (_conv_key(f"{prefix}.0", mask),),
                    ((block.filters, pane, 1),),
                )
            )
            plan.append(_bn_entry(f"block_{i}_res_{p}_bn", f"{prefix}.1", block.filters))
    classes = len(spec.labels) + 1
    plan.append(
        WeightEntry(
            HEAD_LAYER,
            "dense",
            (f"{DECODER_PREFIX}.weight", f"{DECODER_PREFIX}.bias"),
            ((classes, spec.blocks[-1].filters, 1), (classes,)),
        )
    )
    return plan


def expected_state_dict(spec: NemoModelSpec) -> dict:
    """NeMo state-dict key -> PyTorch shape that a checkpoint for ``spec`` must hold.

    Tests use it to make NeMo-style checkpoints without NeMo. ``num_batches_tracked`` entries
    are listed with shape ``()``; they may be absent.
    """
    f = spec.featurizer
    shapes = {
        WINDOW_KEY: (int(round(f["window_size"] * f["sample_rate"])),),
        FILTERBANK_KEY: (1, f["num_mels"], f["n_fft"] // 2 + 1),
    }
    for entry in weight_plan(spec):
        shapes.update(zip(entry.keys, entry.shapes, strict=True))
        if entry.kind == "bn":
            shapes[entry.keys[0].rsplit(".", 1)[0] + OPTIONAL_SUFFIX] = ()
    return shapes


def check_state_dict(spec: NemoModelSpec, state_dict: dict) -> None:
    """NemoImportError listing missing keys, unexpected keys and wrong shapes, if any."""
    expected = expected_state_dict(spec)
    missing = [k for k in expected if k not in state_dict and not k.endswith(OPTIONAL_SUFFIX)]
    extra = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(np.shape(state_dict[k]))}, expected {expected[k]}"
        for k in expected
        if k in state_dict
        and not k.endswith(OPTIONAL_SUFFIX)
        and tuple(np.shape(state_dict[k])) != expected[k]
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if items:
            shown = "; ".join(items[:8]) + (
                f"; ... ({len(items) - 8} more)" if len(items) > 8 else ""
            )
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise NemoImportError(
            "model_weights.ckpt does not match model_config.yaml: " + " | ".join(problems)
        )


def _to_keras(kind: str, tensors: list) -> list:
    if kind == "depthwise":  # torch (C, 1, K) -> DepthwiseConv2D (K, 1, C, 1)
        (w,) = tensors
        return [np.transpose(w[:, 0, :], (1, 0))[:, None, :, None]]
    if kind == "conv":  # torch (O, I/g, K) -> Conv2D (K, 1, I/g, O)
        (w,) = tensors
        return [np.transpose(w, (2, 1, 0))[:, None, :, :]]
    if kind == "bn":  # weight, bias, running_mean, running_var = gamma, beta, mean, variance
        return list(tensors)
    if kind in ("se_squeeze", "se_excite"):  # torch Linear (out, in) -> Dense (in, out)
        (w,) = tensors
        return [w.T]
    if kind == "dense":  # torch Conv1d (V, C, 1) + bias -> Dense (C, V) + bias
        w, b = tensors
        return [w[:, :, 0].T, b]
    raise AssertionError(kind)


def _layer(model, name):
    if "/" in name:
        outer, inner = name.split("/")
        return getattr(model.get_layer(outer), inner)
    return model.get_layer(name)


def load_nemo_weights(model, spec: NemoModelSpec, state_dict: dict) -> None:
    """Checks ``state_dict`` (key -> float32 array in PyTorch layout) against ``spec`` and
    copies every tensor into ``model`` (a QuartzNetCTC built from ``spec.model_kwargs()``)."""
    check_state_dict(spec, state_dict)
    assigned = set()
    for entry in weight_plan(spec):
        tensors = [np.asarray(state_dict[k], dtype=np.float32) for k in entry.keys]
        values = _to_keras(entry.kind, tensors)
        layer = _layer(model, entry.layer)
        current = layer.get_weights()
        shapes = [tuple(v.shape) for v in current]
        if shapes != [tuple(v.shape) for v in values]:
            raise NemoImportError(
                f"internal mapping error: {entry.layer} has weights {shapes}, NeMo tensors "
                f"{entry.keys} give {[tuple(v.shape) for v in values]}."
            )
        layer.set_weights(values)
        assigned.add(entry.layer.split("/")[0])
    unfilled = [
        layer.name for layer in model.layers if layer.weights and layer.name not in assigned
    ]
    if unfilled:
        raise NemoImportError(f"internal mapping error: no NeMo tensors for layers {unfilled}.")
