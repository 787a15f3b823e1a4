"""NeMo's ``CosineAnnealing`` learning-rate policy as a serializable Keras schedule."""

from __future__ import annotations

import math

import tensorflow as tf


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class CosineAnnealing(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Cosine annealing with optional linear warmup and a floor, exactly as NeMo computes it.

    With ``w`` warmup steps and ``N = max_steps`` (spec section 9; NeMo
    ``nemo/core/optim/lr_scheduler.py``, ``WarmupAnnealHoldPolicy`` + ``CosineAnnealing``):

    - ``step <= w`` (only when ``w > 0``): ``lr = base * (step + 1) / (w + 1)``
    - ``w < step <= N``: ``lr = (base - min_lr) * 0.5 * (1 + cos(pi * (step - w) / (N - w))) + min_lr``
    - ``step > N``: ``lr = min_lr``

    ``step`` is the optimizer's iteration count, 0 for the first update, as NeMo's
    ``last_epoch``. Warmup is given as steps or as a ratio of ``max_steps`` (NeMo:
    ``int(warmup_ratio * max_steps)``), not both.

    Args:
        learning_rate: the peak (base) learning rate.
        max_steps: the step at which the cosine reaches ``min_lr``.
        warmup_steps: linear warmup steps, or None.
        warmup_ratio: warmup as a fraction of ``max_steps``, or None.
        min_lr: the floor.

    Example:
        >>> schedule = CosineAnnealing(0.01, max_steps=100, warmup_steps=10)
        >>> round(float(schedule(0)), 6), round(float(schedule(10)), 6)
        (0.000909, 0.01)
    """

    def __init__(
        self,
        learning_rate,
        max_steps,
        warmup_steps=None,
        warmup_ratio=None,
        min_lr=0.0,
        name=None,
        movable_horizon=False,
    ):
        super().__init__()
        if warmup_steps is not None and warmup_ratio is not None:
            raise ValueError(
                "Give warmup_steps or warmup_ratio, not both. "
                f"Received: warmup_steps={warmup_steps}, warmup_ratio={warmup_ratio}"
            )
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1. Received: max_steps={max_steps}")
        if learning_rate < min_lr:
            raise ValueError(
                f"learning_rate ({learning_rate}) must not be below min_lr ({min_lr})."
            )
        if warmup_ratio is not None and not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1). Received: {warmup_ratio}")
        self.learning_rate = float(learning_rate)
        self.max_steps = int(max_steps)
        self.warmup_steps = None if warmup_steps is None else int(warmup_steps)
        self.warmup_ratio = None if warmup_ratio is None else float(warmup_ratio)
        self.min_lr = float(min_lr)
        self.name = name
        # A horizon the trainer may move while training (a time budget's step estimate):
        # read from a variable inside the compiled step, so moving it needs no retrace.
        self.movable_horizon = bool(movable_horizon)
        self._horizon = (
            tf.Variable(float(max_steps), trainable=False, name="lr_horizon")
            if self.movable_horizon
            else None
        )
        if self.resolved_warmup_steps >= self.max_steps:
            raise ValueError(
                f"Warmup ({self.resolved_warmup_steps} steps) must be shorter than max_steps "
                f"({self.max_steps})."
            )

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_ratio is not None:
            return int(self.warmup_ratio * self.max_steps)
        return self.warmup_steps or 0

    def move_horizon(self, max_steps: float) -> float:
        """Sets the step at which the cosine reaches ``min_lr`` (a movable schedule only);
        kept past the warmup. Returns the horizon set."""
        if self._horizon is None:
            raise ValueError("This schedule's horizon is fixed (movable_horizon=False).")
        horizon = max(float(max_steps), self.resolved_warmup_steps + 1.0)
        self._horizon.assign(horizon)
        self.max_steps = int(round(horizon))
        return horizon

    def __call__(self, step):
        with tf.name_scope(self.name or "CosineAnnealing"):
            step = tf.cast(step, tf.float32)
            base = tf.constant(self.learning_rate, tf.float32)
            floor = tf.constant(self.min_lr, tf.float32)
            warmup = float(self.resolved_warmup_steps)
            horizon = tf.constant(float(self.max_steps)) if self._horizon is None else self._horizon
            progress = tf.clip_by_value((step - warmup) / (horizon - warmup), 0.0, 1.0)
            cosine = (base - floor) * 0.5 * (1.0 + tf.cos(math.pi * progress)) + floor
            lr = cosine
            if warmup > 0:
                lr = tf.where(step <= warmup, base * (step + 1.0) / (warmup + 1.0), lr)
            return tf.where(step > horizon, floor, lr)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "max_steps": self.max_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_ratio": self.warmup_ratio,
            "min_lr": self.min_lr,
            "name": self.name,
            "movable_horizon": self.movable_horizon,
        }
