"""The optimizer and learning-rate schedule of a :class:`~qn_keras.training.config.TrainConfig`."""

from __future__ import annotations

import warnings

import tensorflow as tf

from qn_keras.training.config import TrainConfig
from qn_keras.training.schedules import CosineAnnealing


def make_optimizer(config: TrainConfig, schedule):
    """NovoGrad (tensorflow-addons) or Adam with the schedule; loss-scaled under mixed_float16."""
    opt_cfg = config.optimizer
    if opt_cfg.name == "novograd":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tensorflow-addons' end-of-life notice
            import tensorflow_addons as tfa

        optimizer = tfa.optimizers.NovoGrad(
            learning_rate=schedule,
            beta_1=opt_cfg.beta_1,
            beta_2=opt_cfg.beta_2,
            epsilon=opt_cfg.epsilon,
            weight_decay=opt_cfg.weight_decay,
            grad_averaging=opt_cfg.grad_averaging,
        )
    else:
        optimizer = tf.keras.optimizers.legacy.Adam(
            learning_rate=schedule,
            beta_1=opt_cfg.beta_1,
            beta_2=opt_cfg.beta_2,
            epsilon=opt_cfg.epsilon,
        )
    if config.training.precision == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def time_horizon(config: TrainConfig, max_minutes: float | None) -> bool:
    """Whether the cosine anneals over the time budget (``schedule.horizon``)."""
    sched = config.schedule
    if sched.name != "cosine" or not max_minutes or sched.horizon == "steps":
        return False
    return sched.horizon == "time" or sched.max_steps is None


def make_schedule(config: TrainConfig, total_steps: int, movable: bool = False):
    """The configured learning-rate schedule over ``total_steps`` (unless the config fixes
    ``schedule.max_steps``); ``movable``: the trainer moves its horizon (a time budget)."""
    sched = config.schedule
    if sched.name == "constant":
        return tf.keras.optimizers.schedules.PiecewiseConstantDecay(
            [1], [config.optimizer.learning_rate] * 2
        )
    return CosineAnnealing(
        config.optimizer.learning_rate,
        max_steps=sched.max_steps or max(total_steps, 1),
        warmup_steps=sched.warmup_steps,
        warmup_ratio=sched.warmup_ratio,
        min_lr=sched.min_lr,
        movable_horizon=movable,
    )
