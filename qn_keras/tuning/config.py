"""The architecture-search settings, loaded from YAML with strict key checking.

A tune config has four sections; every key is optional and an unknown key is an error naming
the section and the keys it knows (``configs/tune_default.yaml`` is the documented default)::

    space:        the search space (blocks, repeats, groups, width, kernel_factor, dropout,
                  learning_rate, channel_divisor)
    search:       tuner, objective, max_trials, time_budget, seed, hyperband/bayesian knobs
    constraints:  max_params, min_speed, speed-probe length and repeats
    train:        the trainer's recipe (same sections as a ``qn train`` config, without
                  ``model``: the architecture comes from ``space``)

Each hyperparameter in ``space`` is a scalar (fixed), a list (a choice among the values), or a
mapping ``{min, max, step?, sampling?}`` (a range; ``sampling`` is ``linear`` or ``log``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import yaml

# The trainer's strict YAML-to-dataclass builder, so both configs report bad keys alike.
from qn_keras.training.config import ConfigError, TrainConfig, _build

TUNERS = ("hyperband", "bayesian", "random")
OBJECTIVES = ("val_wer", "val_loss")
# Scores given to trials pruned by a constraint: worse than trained models score in practice
# (an untrained model's insertions can push WER past 1, not to 100), but finite, so that
# Bayesian optimization can still fit its Gaussian process to them.
INFEASIBLE_SCORES = {"val_wer": 100.0, "val_loss": 1.0e6}

# The searchable hyperparameters and their value types.
HYPERPARAMETERS = {
    "blocks": int,
    "repeats": int,
    "groups": int,
    "width": float,
    "kernel_factor": float,
    "dropout": float,
    "learning_rate": float,
    # Feature frames the encoder may look ahead (a stateful-streaming model); -1: full context.
    "lookahead": int,
}
NUM_B_GROUPS = 5


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter: fixed (``value``), a choice (``values``) or a range."""

    name: str
    kind: str  # "fixed" | "choice" | "range"
    value: object = None
    values: tuple = ()
    min: float | None = None
    max: float | None = None
    step: float | None = None
    sampling: str = "linear"

    @property
    def candidates(self) -> tuple:
        """Every value a choice or fixed parameter can take; ``(min, max)`` for a range."""
        if self.kind == "fixed":
            return (self.value,)
        if self.kind == "choice":
            return self.values
        return (self.min, self.max)

    def to_dict(self):
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return list(self.values)
        out = {"min": self.min, "max": self.max, "sampling": self.sampling}
        if self.step is not None:
            out["step"] = self.step
        return out


DEFAULT_SPACE = {
    "blocks": [5, 10, 15],
    "repeats": [3, 5],
    "groups": [1, 2, 4],
    "width": [0.5, 0.75, 1.0],
    "kernel_factor": [0.5, 0.75, 1.0],
    "dropout": {"min": 0.0, "max": 0.2, "step": 0.05},
    "learning_rate": {"min": 0.002, "max": 0.05, "sampling": "log"},
    "lookahead": -1,
}


@dataclasses.dataclass
class SpaceConfig:
    """The search space. ``channel_divisor``: scaled channel counts are rounded to a multiple
    of it (and of the block's groups)."""

    params: dict
    channel_divisor: int = 8

    @classmethod
    def from_dict(cls, data: dict | None) -> SpaceConfig:
        data = dict(data or {})
        divisor = data.pop("channel_divisor", 8)
        if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor < 1:
            raise ConfigError(
                f"space.channel_divisor must be an integer >= 1. Received: {divisor!r}"
            )
        unknown = sorted(set(data) - set(HYPERPARAMETERS))
        if unknown:
            raise ConfigError(
                f"Unknown key(s) {unknown} in section 'space'. Known keys: "
                f"{sorted([*HYPERPARAMETERS, 'channel_divisor'])}"
            )
        merged = {**DEFAULT_SPACE, **data}
        params = {name: _param_spec(name, merged[name]) for name in HYPERPARAMETERS}
        _check_values(params)
        return cls(params=params, channel_divisor=divisor)

    def to_dict(self) -> dict:
        out = {name: spec.to_dict() for name, spec in self.params.items()}
        out["channel_divisor"] = self.channel_divisor
        return out


@dataclasses.dataclass
class HyperbandConfig:
    """Hyperband's budget: ``max_epochs`` is the most epochs one model gets; ``factor`` the
    reduction factor between rounds; ``iterations`` how many times the whole schedule runs."""

    max_epochs: int = 9
    factor: int = 3
    iterations: int = 1


@dataclasses.dataclass
class BayesianConfig:
    """Gaussian-process settings: random trials before the GP is used (null: 3 per tuned
    dimension), the GP's noise ``alpha`` and the exploration weight ``beta``."""

    num_initial_points: int | None = None
    alpha: float = 1e-4
    beta: float = 2.6


@dataclasses.dataclass
class SearchConfig:
    """How to search. ``time_budget`` ("2h", "30m", "1h30m", seconds): no trial is launched
    once the search has run that long (a running trial finishes). ``infeasible_score``: the
    objective value reported for trials a constraint prunes (null: 100.0 for val_wer, 1e6
    for val_loss)."""

    tuner: str = "hyperband"
    objective: str = "val_wer"
    max_trials: int | None = 20
    time_budget: str | float | None = None
    seed: int = 0
    infeasible_score: float | None = None
    hyperband: HyperbandConfig = dataclasses.field(default_factory=HyperbandConfig)
    bayesian: BayesianConfig = dataclasses.field(default_factory=BayesianConfig)

    def validate(self):
        if self.tuner not in TUNERS:
            raise ConfigError(f"search.tuner must be one of {TUNERS}. Received: {self.tuner!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"search.objective must be one of {OBJECTIVES}. Received: {self.objective!r}"
            )
        if self.max_trials is not None and self.max_trials < 1:
            raise ConfigError(f"search.max_trials must be >= 1. Received: {self.max_trials}")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        elif self.max_trials is None and self.tuner != "hyperband":
            raise ConfigError(
                f"search: a {self.tuner} search needs max_trials or time_budget, or it never ends."
            )
        hb = self.hyperband
        if hb.max_epochs < 1 or hb.factor < 2 or hb.iterations < 1:
            raise ConfigError(
                "search.hyperband needs max_epochs >= 1, factor >= 2, iterations >= 1. "
                f"Received: {dataclasses.asdict(hb)}"
            )
        n = self.bayesian.num_initial_points
        if n is not None and n < 1:
            raise ConfigError(f"search.bayesian.num_initial_points must be >= 1. Received: {n}")

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    @property
    def penalty(self) -> float:
        if self.infeasible_score is not None:
            return float(self.infeasible_score)
        return INFEASIBLE_SCORES[self.objective]


@dataclasses.dataclass
class ConstraintsConfig:
    """Limits a model must meet to be trained. ``max_params``: trainable parameters.
    ``min_speed``: seconds of audio per second on the CPU, timed by a forward pass over
    ``probe_seconds`` of audio (best of ``probe_repeats`` runs after one warm-up)."""

    max_params: int | None = None
    min_speed: float | None = None
    probe_seconds: float = 10.0
    probe_repeats: int = 3

    def validate(self):
        if self.max_params is not None and self.max_params < 1:
            raise ConfigError(f"constraints.max_params must be >= 1. Received: {self.max_params}")
        if self.min_speed is not None and self.min_speed <= 0:
            raise ConfigError(f"constraints.min_speed must be > 0. Received: {self.min_speed}")
        if self.probe_seconds <= 0 or self.probe_repeats < 1:
            raise ConfigError(
                "constraints.probe_seconds must be > 0 and probe_repeats >= 1. Received: "
                f"{self.probe_seconds}, {self.probe_repeats}"
            )


@dataclasses.dataclass
class TuneConfig:
    space: SpaceConfig
    search: SearchConfig
    constraints: ConstraintsConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        train = self.train.to_dict()
        train.pop("model")
        return {
            "space": self.space.to_dict(),
            "search": dataclasses.asdict(self.search),
            "constraints": dataclasses.asdict(self.constraints),
            "train": train,
        }

    @classmethod
    def from_dict(cls, data: dict | None, base_dir=None) -> TuneConfig:
        data = dict(data or {})
        known = ("space", "search", "constraints", "train")
        unknown = sorted(set(data) - set(known))
        if unknown:
            train_sections = {f.name for f in dataclasses.fields(TrainConfig)}
            hint = (
                " It looks like a `qn train` config: put its sections (without `model`) under "
                "`train:`."
                if set(unknown) <= train_sections
                else ""
            )
            raise ConfigError(f"Unknown section(s) {unknown}. Known sections: {list(known)}.{hint}")
        for key in known:
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise ConfigError(f"Section {key!r} must be a mapping. Received: {data[key]!r}")
        train = dict(data.get("train") or {})
        if "model" in train:
            raise ConfigError(
                "train.model is not used by `qn tune`: the architecture comes from `space`. "
                "Remove train.model."
            )
        search = _build(SearchConfig, data.get("search") or {}, "search")
        search.validate()
        constraints = _build(ConstraintsConfig, data.get("constraints") or {}, "constraints")
        constraints.validate()
        return cls(
            space=SpaceConfig.from_dict(data.get("space")),
            search=search,
            constraints=constraints,
            train=TrainConfig.from_dict(train, base_dir=base_dir),
        )


def load_tune_config(path=None, overrides: dict | None = None) -> TuneConfig:
    """Reads a tune config (None: the defaults), with ``overrides`` (``{section: {key:
    value}}``, e.g. from the command line) on top; ConfigError names the file and the problem."""
    data, base_dir = {}, None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Tune config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections.")
        base_dir = path.parent
    for section, values in (overrides or {}).items():
        if values:
            if data.get(section) is not None and not isinstance(data[section], dict):
                break  # from_dict reports the malformed section
            data[section] = {**(data.get(section) or {}), **values}
    try:
        return TuneConfig.from_dict(data, base_dir=base_dir)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([dhms])", re.IGNORECASE)
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text) -> float:
    """Seconds in ``"2h"``, ``"1h30m"``, ``"45m"``, ``"90s"`` or a plain number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().replace(" ", "")
        try:
            seconds = float(s)
        except ValueError:
            parts = _DURATION.findall(s)
            if not parts or "".join(n + u for n, u in parts).lower() != s.lower():
                raise ConfigError(
                    f"Cannot read the duration {text!r}; write e.g. 2h, 45m, 1h30m or 90s."
                ) from None
            seconds = sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"A duration must be positive. Received: {text!r}")
    return seconds


def _param_spec(name: str, raw) -> ParamSpec:
    kind = HYPERPARAMETERS[name]
    where = f"space.{name}"

    def number(value, what):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}{what} must be a number. Received: {value!r}")
        if kind is int and float(value) != int(value):
            raise ConfigError(f"{where}{what} must be an integer. Received: {value!r}")
        return kind(value)

    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"{where} is an empty list; give at least one value.")
        values = tuple(number(v, f"[{i}]") for i, v in enumerate(raw))
        if len(set(values)) != len(values):
            raise ConfigError(f"{where} lists a value twice. Received: {raw}")
        if len(values) == 1:
            return ParamSpec(name, "fixed", value=values[0])
        return ParamSpec(name, "choice", values=values)
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"min", "max", "step", "sampling"})
        if unknown or "min" not in raw or "max" not in raw:
            raise ConfigError(
                f"{where}: a range is {{min, max, step (optional), sampling (optional)}}. "
                f"Received: {raw}"
            )
        lo, hi = number(raw["min"], ".min"), number(raw["max"], ".max")
        if not lo < hi:
            raise ConfigError(f"{where}: min must be < max. Received: {lo}, {hi}")
        step = None if raw.get("step") is None else number(raw["step"], ".step")
        if step is not None and step <= 0:
            raise ConfigError(f"{where}.step must be > 0. Received: {step}")
        sampling = raw.get("sampling", "linear")
        if sampling not in ("linear", "log"):
            raise ConfigError(f"{where}.sampling must be linear or log. Received: {sampling!r}")
        if sampling == "log" and lo <= 0:
            raise ConfigError(f"{where}: log sampling needs min > 0. Received: {lo}")
        if sampling == "log" and step is not None:
            raise ConfigError(f"{where}: give step or log sampling, not both.")
        return ParamSpec(name, "range", min=lo, max=hi, step=step, sampling=sampling)
    return ParamSpec(name, "fixed", value=number(raw, ""))


def _check_values(params: dict):
    """Rejects values no model can have, naming the parameter, before any search starts."""
    for name, spec in params.items():
        for v in spec.candidates:
            if name == "blocks" and (v < NUM_B_GROUPS or v % NUM_B_GROUPS):
                raise ConfigError(
                    f"space.blocks must be multiples of {NUM_B_GROUPS} (the B-blocks repeat "
                    f"over QuartzNet's {NUM_B_GROUPS} groups). Received: {v}"
                )
            if name in ("repeats", "groups") and v < 1:
                raise ConfigError(f"space.{name} values must be >= 1. Received: {v}")
            if name in ("width", "kernel_factor", "learning_rate") and v <= 0:
                raise ConfigError(f"space.{name} values must be > 0. Received: {v}")
            if name == "lookahead" and v < -1:
                raise ConfigError(
                    f"space.lookahead values must be >= 0 feature frames, or -1 for full "
                    f"context. Received: {v}"
                )
            if name == "dropout" and not 0.0 <= v < 1.0:
                raise ConfigError(f"space.dropout values must be in [0, 1). Received: {v}")
    blocks = params["blocks"]
    if blocks.kind == "range" and (blocks.step is None or blocks.step % NUM_B_GROUPS):
        raise ConfigError(
            f"space.blocks as a range needs a step that is a multiple of {NUM_B_GROUPS}."
        )
