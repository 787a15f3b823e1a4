"""The training recipe as typed dataclasses, loaded from YAML with strict key checking.

Defaults are NeMo's QuartzNet recipe (spec sections 1, 3 and 9): NovoGrad (lr 0.01, betas
0.8/0.5, weight decay 0.001), cosine annealing to 0, SpecCutout with 5 rectangles of up to 120
frames by 50 mel bins, batch 32 per device, float32.

A config file has the sections below; every key is optional and an unknown key is an error
naming the section and the keys it knows::

    model:        {preset: quartznet_5x5, blocks: null, overrides: {}}
    labels:       null            # labels file (JSON or one per line); null = English
    featurizer:   {era: current}  # any FeaturizerConfig field
    optimizer:    {name: novograd, learning_rate: 0.01, beta_1: 0.8, beta_2: 0.5, ...}
    schedule:     {name: cosine, warmup_steps: null, warmup_ratio: null, min_lr: 0.0, ...}
    augment:      {freq_masks: 0, time_masks: 0, rect_masks: 5, rect_time: 120, ...}
    data:         {batch_size: 32, eval_batch_size: 32, bucket_boundaries: null, ...}
    training:     {epochs: 5, max_steps: null, precision: float32, seed: 0, ...}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from qn_keras.errors import UserInputError

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("novograd", "adam")
SCHEDULES = ("cosine", "constant")
HORIZONS = ("auto", "steps", "time")


class ConfigError(UserInputError):
    """A training config that cannot be used; the message names the key and what to change."""


@dataclasses.dataclass
class ModelConfig:
    """Architecture: a preset, or a full block list (``stackwise_*`` lists), plus overrides.

    ``overrides`` are any :class:`~qn_keras.QuartzNetCTC` arguments applied on top, e.g.
    ``{stackwise_dropout: [...], activation: swish}``. When training starts from ``--init``,
    the architecture comes from the initial model and this section is ignored.
    """

    preset: str | None = "quartznet_5x5"
    blocks: dict | None = None
    overrides: dict = dataclasses.field(default_factory=dict)

    def validate(self):
        if (self.preset is None) == (self.blocks is None):
            raise ConfigError(
                "model: give exactly one of `preset` (a name) or `blocks` (the stackwise_* "
                f"lists). Received: preset={self.preset!r}, blocks="
                f"{'set' if self.blocks is not None else None}"
            )
        if self.preset is not None:
            from qn_keras.presets import preset_kwargs

            try:
                preset_kwargs(self.preset)
            except ValueError as e:
                raise ConfigError(f"model.preset: {e}") from None
        if self.blocks is not None:
            bad = [k for k in self.blocks if not k.startswith("stackwise_")]
            if bad:
                raise ConfigError(
                    f"model.blocks takes only stackwise_* lists; move {bad} to model.overrides."
                )
        if "vocabulary_size" in self.overrides:
            raise ConfigError(
                "model.overrides.vocabulary_size is set from the labels; use `labels:` instead."
            )

    def model_kwargs(self) -> dict:
        """``build_model`` keyword arguments (preset name is returned separately)."""
        kwargs = dict(self.blocks or {})
        kwargs.update(self.overrides)
        return kwargs


@dataclasses.dataclass
class OptimizerConfig:
    """NovoGrad as NeMo configures it for QuartzNet (``adam`` is there for comparisons)."""

    name: str = "novograd"
    learning_rate: float = 0.01
    beta_1: float = 0.8
    beta_2: float = 0.5
    weight_decay: float = 0.001
    epsilon: float = 1e-8
    grad_averaging: bool = False

    def validate(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer.name must be one of {OPTIMIZERS}. Received: {self.name!r}"
            )
        if self.learning_rate <= 0:
            raise ConfigError(
                f"optimizer.learning_rate must be > 0. Received: {self.learning_rate}"
            )
        for key in ("beta_1", "beta_2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optimizer.{key} must be in [0, 1). Received: {value}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0. Received: {self.weight_decay}")


@dataclasses.dataclass
class ScheduleConfig:
    """Learning-rate policy: NeMo's CosineAnnealing, or constant.

    ``max_steps`` is the cosine's horizon; null means the training length (``training.max_steps``
    or epochs times the steps per epoch). ``horizon``: ``time`` anneals over the time budget
    (``training.max_minutes`` or ``--max-minutes``): the trainer re-estimates the step at which
    the budget runs out from the pace so far, every ``log_every_steps``, so a run cut by time
    ends at ``min_lr`` instead of near its peak; ``steps`` keeps the step horizon; ``auto``
    (default) is ``time`` when there is a time budget and no fixed ``max_steps`` here.
    """

    name: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    min_lr: float = 0.0
    max_steps: int | None = None
    horizon: str = "auto"

    def validate(self):
        if self.name not in SCHEDULES:
            raise ConfigError(f"schedule.name must be one of {SCHEDULES}. Received: {self.name!r}")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError("schedule: give warmup_steps or warmup_ratio, not both.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0. Received: {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(
                f"schedule.warmup_ratio must be in [0, 1). Received: {self.warmup_ratio}"
            )
        if self.min_lr < 0:
            raise ConfigError(f"schedule.min_lr must be >= 0. Received: {self.min_lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"schedule.max_steps must be >= 1. Received: {self.max_steps}")
        if self.horizon not in HORIZONS:
            raise ConfigError(
                f"schedule.horizon must be one of {HORIZONS}. Received: {self.horizon!r}"
            )


@dataclasses.dataclass
class AugmentConfig:
    """On-the-fly feature augmentation of training batches (NeMo ``SpectrogramAugmentation``).

    SpecAugment: ``freq_masks`` bands of up to ``freq_width`` mel bins and ``time_masks`` spans
    of up to ``time_width`` frames (a float in (0, 1) is a fraction of each utterance's length,
    NeMo's adaptive width). SpecCutout: ``rect_masks`` rectangles of up to ``rect_time`` frames
    by ``rect_freq`` bins. Time warping: shift one random point of the time axis by up to
    ``time_warp`` frames (0 = off).
    """

    freq_masks: int = 0
    freq_width: int = 10
    time_masks: int = 0
    time_width: int | float = 10
    rect_masks: int = 5
    rect_time: int = 120
    rect_freq: int = 50
    time_warp: int = 0
    mask_value: float = 0.0

    def validate(self):
        for key in ("freq_masks", "time_masks", "rect_masks", "time_warp"):
            if getattr(self, key) < 0:
                raise ConfigError(f"augment.{key} must be >= 0. Received: {getattr(self, key)}")
        for key in ("freq_width", "rect_time", "rect_freq"):
            if getattr(self, key) < 1:
                raise ConfigError(f"augment.{key} must be >= 1. Received: {getattr(self, key)}")
        width = self.time_width
        if isinstance(width, float) and not 0.0 < width < 1.0 or width <= 0:
            raise ConfigError(
                "augment.time_width must be a frame count >= 1 or a fraction in (0, 1). "
                f"Received: {width}"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.freq_masks or self.time_masks or self.rect_masks or self.time_warp)


@dataclasses.dataclass
class DataConfig:
    """Batching. ``batch_size`` is per device (NeMo's convention); the global batch is
    ``batch_size * replicas``. ``bucket_boundaries`` are feature-frame lengths for length
    bucketing: a list, ``auto`` (about 8 equal-count buckets from the data's length
    histogram) or null (none). ``max_duration`` (seconds) skips longer utterances when reading
    a manifest directly (NeMo: 16.7)."""

    batch_size: int = 32
    eval_batch_size: int = 32
    bucket_boundaries: list | str | None = "auto"
    shuffle: bool = True
    max_duration: float | None = 16.7

    def validate(self):
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1. Received: {getattr(self, key)}")
        b = self.bucket_boundaries
        if isinstance(b, str):
            if b != "auto":
                raise ConfigError(
                    f"data.bucket_boundaries must be a list, auto or null. Received: {b!r}"
                )
        elif b is not None and (not b or sorted(b) != list(b) or min(b) < 1):
            raise ConfigError(
                f"data.bucket_boundaries must be increasing positive frame counts. Received: {b}"
            )


@dataclasses.dataclass
class TrainingConfig:
    """Run length, precision, checkpoints, validation and fine-tuning knobs.

    Training stops at the first of ``epochs``, ``max_steps`` and ``max_minutes``.
    ``early_stopping_patience``: stop after this many validations without a WER improvement
    of at least ``early_stopping_min_delta`` (null = never). ``freeze_encoder_steps``: train
    only the CTC head for the first N steps (fine-tuning).
    """

    epochs: int = 5
    max_steps: int | None = None
    max_minutes: float | None = None
    precision: str = "float32"
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    validate_every_steps: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    freeze_encoder_steps: int = 0
    seed: int = 0

    def validate(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"training.precision must be one of {PRECISIONS}. Received: {self.precision!r}"
            )
        if self.epochs < 1:
            raise ConfigError(f"training.epochs must be >= 1. Received: {self.epochs}")
        for key in (
            "max_steps",
            "checkpoint_every_steps",
            "keep_checkpoints",
            "log_every_steps",
            "validate_every_steps",
            "early_stopping_patience",
        ):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"training.{key} must be >= 1. Received: {value}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"training.max_minutes must be > 0. Received: {self.max_minutes}")
        if self.freeze_encoder_steps < 0:
            raise ConfigError(
                f"training.freeze_encoder_steps must be >= 0. Received: {self.freeze_encoder_steps}"
            )


@dataclasses.dataclass
class TrainConfig:
    """The whole recipe. ``labels`` is a labels file path (None: NeMo's English labels)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    labels: str | None = None
    featurizer: dict = dataclasses.field(default_factory=dict)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)

    def validate(self) -> TrainConfig:
        for section in (self.model, self.optimizer, self.schedule, self.augment, self.data):
            section.validate()
        self.training.validate()
        self.featurizer_config()
        return self

    def featurizer_config(self):
        from qn_keras.featurizer import FeaturizerConfig

        known = {f.name for f in dataclasses.fields(FeaturizerConfig)}
        unknown = sorted(set(self.featurizer) - known)
        if unknown:
            raise ConfigError(
                f"Unknown key(s) {unknown} in section 'featurizer'. Known keys: {sorted(known)}"
            )
        try:
            return FeaturizerConfig(**self.featurizer)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"featurizer: {e}") from None

    def tokenizer(self):
        from qn_keras.tokenizer import CharTokenizer

        if self.labels is None:
            return CharTokenizer()
        path = Path(self.labels)
        if not path.is_file():
            raise ConfigError(f"labels: file not found: {path}")
        return CharTokenizer.from_file(path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None, base_dir=None) -> TrainConfig:
        """Builds and validates a config; relative ``labels`` paths resolve against
        ``base_dir`` (the config file's folder)."""
        config = _build(cls, data or {}, "config")
        if config.labels is not None and base_dir is not None:
            config.labels = str((Path(base_dir) / config.labels).resolve())
        return config.validate()

    def replace(self, **dotted) -> TrainConfig:
        """A copy with ``section.key=value`` overrides, e.g. ``replace(**{"training.seed": 1})``."""
        data = self.to_dict()
        for key, value in dotted.items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"Unknown config section {part!r} in override {key!r}.")
                node = node[part]
            node[leaf] = value
        return TrainConfig.from_dict(data)


def load_config(path) -> TrainConfig:
    """Reads a YAML recipe; ConfigError names a missing file, bad YAML or a bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections.")
    try:
        return TrainConfig.from_dict(data, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _build(cls, data, where):
    if not isinstance(data, dict):
        raise ConfigError(f"Section {where!r} must be a mapping. Received: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {unknown} in section {where!r}. Known keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = name if where == "config" else f"{where}.{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    return cls(**kwargs)


def _check_type(value, hint, key):
    allowed = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} must not be null.")
    for t in allowed:
        t = typing.get_origin(t) or t
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) if int not in allowed else value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t in (str, dict, list) and isinstance(value, t):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key} must be {names}. Received: {value!r}")


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def architecture_from_config(model_cfg: ModelConfig) -> dict:
    """``QuartzNetCTC`` arguments (without ``vocabulary_size``) for a ``ModelConfig``, checked
    without building the model (:func:`qn_keras.presets.resolve_architecture`)."""
    from qn_keras.presets import resolve_architecture

    try:
        return resolve_architecture(model_cfg.preset, model_cfg.model_kwargs())
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
