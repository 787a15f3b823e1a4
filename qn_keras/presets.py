"""Named architectures as kwargs for :class:`QuartzNetCTC` / :class:`QuartzNetBackbone`.

Block lists follow NeMo's configs (spec section 1): C1, the B-blocks, C2, C3.
"""

from __future__ import annotations

import copy

from qn_keras.errors import UserInputError

# (filters, kernel) of QuartzNet's five B-block groups B1..B5.
_QUARTZNET_B = [(256, 33), (256, 39), (512, 51), (512, 63), (512, 75)]


def _quartznet(blocks_per_group: int, groups: int = 1) -> dict:
    b = [fk for fk in _QUARTZNET_B for _ in range(blocks_per_group)]
    n = len(b)
    return {
        "stackwise_filters": [256] + [f for f, _ in b] + [512, 1024],
        "stackwise_kernel_sizes": [33] + [k for _, k in b] + [87, 1],
        "stackwise_strides": [2] + [1] * n + [1, 1],
        "stackwise_dilations": [1] + [1] * n + [2, 1],
        "stackwise_repeats": [1] + [5] * n + [1, 1],
        "stackwise_residual": [False] + [True] * n + [False, False],
        "stackwise_separable": [True] + [True] * n + [True, False],
        # Grouped variants group the pointwise convs of the B-blocks, where the MACs are.
        "stackwise_groups": [1] + [groups] * n + [1, 1],
        "stackwise_dropout": [0.0] * (n + 3),
    }


def _jasper_10x5_dr() -> dict:
    filters = [256, 256, 384, 384, 512, 512, 640, 640, 768, 768]
    kernels = [11, 11, 13, 13, 17, 17, 21, 21, 25, 25]
    dropout = [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3]
    return {
        "stackwise_filters": [256] + filters + [896, 1024],
        "stackwise_kernel_sizes": [11] + kernels + [29, 1],
        "stackwise_strides": [2] + [1] * 10 + [1, 1],
        "stackwise_dilations": [1] + [1] * 10 + [2, 1],
        "stackwise_repeats": [1] + [5] * 10 + [1, 1],
        "stackwise_residual": [False] + [True] * 10 + [False, False],
        "stackwise_residual_dense": [False] + [True] * 10 + [False, False],
        "stackwise_separable": [False] * 13,
        "stackwise_dropout": [0.2] + dropout + [0.4, 0.4],
    }


def _contextnet_5x5() -> dict:
    # ContextNet-style (arXiv:2005.03191): every block has squeeze-and-excitation over the
    # global context and Swish; downsampling is progressive (stride 2 at C1 and at the first
    # B2 block, 4x in all: 40 ms output frames, still fine for character CTC).
    n = 5
    return {
        "stackwise_filters": [256, 256, 256, 512, 512, 512, 512, 1024],
        "stackwise_kernel_sizes": [5, 5, 5, 5, 5, 5, 5, 1],
        "stackwise_strides": [2, 1, 2, 1, 1, 1, 1, 1],
        "stackwise_dilations": [1] * (n + 3),
        "stackwise_repeats": [1] + [5] * n + [1, 1],
        "stackwise_residual": [False] + [True] * n + [False, False],
        "stackwise_separable": [True] * (n + 2) + [False],
        "stackwise_se": [True] * (n + 3),
        "stackwise_dropout": [0.1] * (n + 3),
        "activation": "swish",
    }


PRESETS = {
    "quartznet_5x5": _quartznet(1),
    "quartznet_10x5": _quartznet(2),
    "quartznet_15x5": _quartznet(3),
    "quartznet_5x5_g2": _quartznet(1, groups=2),
    "quartznet_5x5_g4": _quartznet(1, groups=4),
    "quartznet_10x5_g2": _quartznet(2, groups=2),
    "quartznet_10x5_g4": _quartznet(2, groups=4),
    "quartznet_15x5_g2": _quartznet(3, groups=2),
    "quartznet_15x5_g4": _quartznet(3, groups=4),
    "jasper_10x5": _jasper_10x5_dr(),
    "contextnet_5x5": _contextnet_5x5(),
}


def preset_kwargs(name: str) -> dict:
    """A deep copy of a preset's kwargs; ValueError naming the known presets otherwise."""
    if name not in PRESETS:
        raise UserInputError(
            f"Unknown preset {name!r}. Known presets: {', '.join(sorted(PRESETS))}."
        )
    return copy.deepcopy(PRESETS[name])


def build_model(name: str = "quartznet_5x5", vocabulary_size: int = 29, **overrides):
    """A :class:`QuartzNetCTC` from a preset, with any argument overridden."""
    from qn_keras.quartznet_ctc import QuartzNetCTC

    kwargs = preset_kwargs(name)
    kwargs.update(overrides)
    return QuartzNetCTC(vocabulary_size=vocabulary_size, name=kwargs.pop("name", name), **kwargs)


# QuartzNetCTC arguments that are not per-block lists.
MODEL_ARGS = (
    "num_features",
    "activation",
    "kernel_size_factor",
    "se_reduction_ratio",
    "lookahead",
    "name",
)


def resolve_architecture(preset: str | None, overrides: dict) -> dict:
    """``QuartzNetCTC`` arguments (without ``vocabulary_size``): a preset's (if any) with
    ``overrides`` applied, checked and normalized without building the model. ValueError
    saying what is wrong."""
    from qn_keras.quartznet_backbone import STACKWISE_ARGS, normalize_block_lists

    kwargs = preset_kwargs(preset) if preset else {}
    kwargs.update(overrides)
    unknown = sorted(set(kwargs) - set(STACKWISE_ARGS) - set(MODEL_ARGS))
    if unknown:
        raise UserInputError(
            f"unknown model argument(s) {unknown}. Known: {sorted(STACKWISE_ARGS + MODEL_ARGS)}"
        )
    stackwise = {k: v for k, v in kwargs.items() if k in STACKWISE_ARGS}
    if not stackwise.get("stackwise_filters") or not stackwise.get("stackwise_kernel_sizes"):
        raise UserInputError("blocks need at least stackwise_filters and stackwise_kernel_sizes.")
    blocks = normalize_block_lists(**stackwise)
    others = {k: v for k, v in kwargs.items() if k in MODEL_ARGS}
    others.setdefault("name", preset or "quartznet")
    return {**others, **blocks}


def with_vocabulary(architecture: dict, vocabulary_size: int) -> dict:
    return {**architecture, "vocabulary_size": vocabulary_size}


def build_from_architecture(architecture: dict):
    """A ``QuartzNetCTC`` from :func:`resolve_architecture`'s output plus ``vocabulary_size``."""
    from qn_keras.quartznet_ctc import QuartzNetCTC

    return QuartzNetCTC.from_config(dict(architecture))
