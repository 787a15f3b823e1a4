"""The QuartzNet search space as Keras Tuner hyperparameters, and trial values to a model.

A trial's values map onto QuartzNet's block list the way the presets are made (spec section 1,
``qn_keras.presets``): ``blocks`` B is 5, 10 or 15 B-blocks, each of the five QuartzNet groups
B1..B5 repeated B/5 times; ``repeats`` R is the sub-blocks per B-block; ``groups`` groups the
B-blocks' pointwise convolutions (as the ``_g2``/``_g4`` presets do); ``width`` scales every
encoder block's channels (rounded to a multiple of ``channel_divisor`` and of the groups);
``kernel_factor`` scales every kernel, rounded to an odd size by :class:`QuartzNetCTC`
(NeMo's ``kernel_size_factor``); ``dropout`` is every block's dropout; ``lookahead`` (feature
frames, -1 for full context) makes a model for stateful streaming.
"""

from __future__ import annotations

import math

from qn_keras.presets import preset_kwargs
from qn_keras.tuning.config import NUM_B_GROUPS, SpaceConfig

# One B-block per group: the block list the wider presets are made from.
BASE_PRESET = "quartznet_5x5"


def declare_hyperparameters(hp, space: SpaceConfig):
    """Registers every hyperparameter of ``space`` on a ``keras_tuner.HyperParameters``."""
    for name, spec in space.params.items():
        if spec.kind == "fixed":
            hp.Fixed(name, spec.value)
        elif spec.kind == "choice":
            # Ordered, so Bayesian optimization treats bigger as bigger.
            hp.Choice(name, list(spec.values), ordered=True)
        elif isinstance(spec.min, int) and isinstance(spec.max, int):
            hp.Int(name, spec.min, spec.max, step=spec.step or 1, sampling=spec.sampling)
        else:
            hp.Float(name, spec.min, spec.max, step=spec.step, sampling=spec.sampling)
    return hp


def round_channels(channels: float, divisor: int) -> int:
    """The multiple of ``divisor`` nearest to ``channels``, at least ``divisor``."""
    return max(divisor, int(channels / divisor + 0.5) * divisor)


def architecture(values: dict, space: SpaceConfig) -> dict:
    """:class:`~qn_keras.QuartzNetCTC` keyword arguments (without ``vocabulary_size``) for one
    trial's hyperparameter values."""
    blocks = int(values["blocks"])
    if blocks < NUM_B_GROUPS or blocks % NUM_B_GROUPS:
        raise ValueError(f"blocks must be a multiple of {NUM_B_GROUPS}. Received: {blocks}")
    per_group = blocks // NUM_B_GROUPS
    repeats, groups = int(values["repeats"]), int(values["groups"])
    base = preset_kwargs(BASE_PRESET)
    num_base = len(base["stackwise_filters"])
    b_blocks = range(1, 1 + NUM_B_GROUPS)  # C1, B1..B5, C2, C3
    if num_base != NUM_B_GROUPS + 3:
        raise ValueError(f"{BASE_PRESET} does not have C1, five B-blocks, C2 and C3.")

    kwargs = {}
    for key, entries in base.items():
        if not key.startswith("stackwise_"):
            kwargs[key] = entries
            continue
        kwargs[key] = (
            [entries[0]] + [entries[i] for i in b_blocks for _ in range(per_group)] + entries[6:]
        )
    n = len(kwargs["stackwise_filters"])
    is_b = [False] + [True] * blocks + [False] * (n - blocks - 1)
    kwargs["stackwise_repeats"] = [
        repeats if b else r for b, r in zip(is_b, kwargs["stackwise_repeats"], strict=True)
    ]
    kwargs["stackwise_groups"] = [
        groups if b else g for b, g in zip(is_b, kwargs["stackwise_groups"], strict=True)
    ]
    width = float(values["width"])
    kwargs["stackwise_filters"] = [
        round_channels(f * width, math.lcm(space.channel_divisor, g))
        for f, g in zip(kwargs["stackwise_filters"], kwargs["stackwise_groups"], strict=True)
    ]
    kwargs["stackwise_dropout"] = [float(values["dropout"])] * n
    kwargs["kernel_size_factor"] = float(values["kernel_factor"])
    if int(values.get("lookahead", -1)) >= 0:
        kwargs["lookahead"] = int(values["lookahead"])
    return kwargs


def describe(values: dict) -> str:
    """A short name for a trial's architecture, e.g. ``10x3 g2 w0.75 k0.5``."""
    name = (
        f"{int(values['blocks'])}x{int(values['repeats'])} g{int(values['groups'])} "
        f"w{float(values['width']):g} k{float(values['kernel_factor']):g}"
    )
    if int(values.get("lookahead", -1)) >= 0:
        name += f" la{int(values['lookahead'])}"
    return name
