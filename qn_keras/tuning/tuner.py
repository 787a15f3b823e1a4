"""Keras Tuner's search loop around the project's trainer.

:class:`QuartzNetTuner` is a ``keras_tuner.Tuner`` whose ``run_trial`` (1) builds the trial's
model, counts its parameters and MACs and times a CPU forward pass; (2) if the model breaks
a constraint (``max_params``, ``min_speed``), reports it to the oracle as *infeasible* without
training it: the trial completes with the objective set to ``search.infeasible_score`` (a
value worse than any trained model scores), so Hyperband never promotes it and Bayesian
optimization learns to avoid that region (a ``FAILED`` status would be skipped by the Gaussian
process and, three in a row, would abort the search); (3) otherwise trains it with
:class:`qn_keras.training.trainer.Trainer` (the full recipe: NovoGrad, cosine schedule,
SpecAugment, precision and distribution strategy from the ``train`` config) and returns the
best validation WER and the validation loss of that checkpoint.

Everything a trial writes lives in the Keras Tuner project folder, ``trial_<id>/``:
``trial.json`` (Keras Tuner's), ``qn_trial.json`` (size, speed, metrics, status) and
``train/`` (the trainer's run, resumable). A search killed at any point and started again with
the same command reloads the oracle (``overwrite=False``), re-runs the trial that was
interrupted (its trainer resumes from its last checkpoint) and goes on.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import keras_tuner as kt
import tensorflow as tf

from qn_keras import files
from qn_keras.quartznet_ctc import QuartzNetCTC
from qn_keras.training.config import TrainConfig
from qn_keras.tuning.config import TuneConfig
from qn_keras.tuning.probe import probe_model
from qn_keras.tuning.search_space import architecture, declare_hyperparameters, describe

TRIAL_FILE = "qn_trial.json"
TRAIN_DIR = "train"
HYPERBAND_KEYS = ("tuner/epochs", "tuner/initial_epoch", "tuner/bracket", "tuner/round")


class QuartzNetHyperModel(kt.HyperModel):
    """The search space of a :class:`~qn_keras.tuning.config.SpaceConfig` as a HyperModel:
    ``build(hp)`` returns the trial's :class:`~qn_keras.QuartzNetCTC` (uncompiled)."""

    def __init__(self, space, vocabulary_size: int = 29, num_features: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.space = space
        self.vocabulary_size = vocabulary_size
        self.num_features = num_features

    def declare_hyperparameters(self, hp):
        declare_hyperparameters(hp, self.space)

    def architecture(self, values: dict) -> dict:
        return architecture(values, self.space)

    def build(self, hp):
        return QuartzNetCTC(
            vocabulary_size=self.vocabulary_size,
            num_features=self.num_features,
            name="quartznet_trial",
            **self.architecture(hp.values),
        )


class _TimeBudget:
    """Oracle mixin: once the search has run ``time_budget`` seconds, no new trial starts.

    Elapsed time is kept in the oracle's saved state, so a resumed search continues the same
    budget (time between the last save and a kill is not counted)."""

    def __init__(self, *args, time_budget: float | None = None, clock=time.monotonic, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_budget = time_budget
        self.budget_exhausted = False
        self._elapsed_before = 0.0
        self._clock = clock  # seconds; a parameter so that tests need not wait on a real one
        self._session_start = clock()

    def elapsed_seconds(self) -> float:
        return self._elapsed_before + self._clock() - self._session_start

    def populate_space(self, trial_id):
        if self.time_budget is not None and self.elapsed_seconds() >= self.time_budget:
            self.budget_exhausted = True
            return {"status": kt.engine.trial.TrialStatus.STOPPED, "values": None}
        return super().populate_space(trial_id)

    def get_state(self):
        state = super().get_state()
        state["qn_elapsed_seconds"] = self.elapsed_seconds()
        return state

    def set_state(self, state):
        super().set_state(state)
        self._elapsed_before = float(state.get("qn_elapsed_seconds", 0.0))
        self._session_start = self._clock()


class RandomSearchOracle(_TimeBudget, kt.oracles.RandomSearchOracle):
    pass


def soften_penalties(scores, penalty: float):
    """Scores for the Gaussian process, with every pruned or diverged trial's ``penalty``
    lowered to one spread (worst minus best trained score) above the worst trained score.

    Keras Tuner fits the process on normalized scores; next to a penalty of 100 (WER as a
    fraction is ~0-1), every trained trial normalizes to the same value and the process can
    only learn where models are infeasible, not which trained ones are better. The leaderboard
    and Hyperband keep the real penalty; only the fit sees the softened one."""
    import numpy as np

    scores = np.asarray(scores, dtype=float)
    trained = scores[scores < penalty]
    if trained.size == 0 or trained.size == scores.size:
        return scores
    worst = float(trained.max())
    spread = max(worst - float(trained.min()), 0.1 * abs(worst), 1e-6)
    return np.where(scores >= penalty, worst + spread, scores)


class BayesianOptimizationOracle(_TimeBudget, kt.oracles.BayesianOptimizationOracle):
    """Bayesian optimization whose Gaussian process sees softened penalties
    (:func:`soften_penalties`); ``penalty`` is set by :func:`make_oracle`."""

    penalty: float | None = None

    def _vectorize_trials(self):  # Keras Tuner 1.4's hook that builds the process's (x, y)
        x, y = super()._vectorize_trials()
        if self.penalty is None or len(y) == 0:
            return x, y
        return x, soften_penalties(y, self.penalty)


class HyperbandOracle(_TimeBudget, kt.oracles.HyperbandOracle):
    pass


def make_oracle(config: TuneConfig) -> kt.Oracle:
    """The configured oracle with the objective (``val_wer`` or ``val_loss``, minimized), the
    trial budget and the time budget."""
    search = config.search
    objective = kt.Objective(search.objective, direction="min")
    common = {
        "objective": objective,
        "seed": search.seed,
        "time_budget": search.time_budget_seconds,
    }
    if search.tuner == "random":
        return RandomSearchOracle(max_trials=search.max_trials, **common)
    if search.tuner == "bayesian":
        b = search.bayesian
        oracle = BayesianOptimizationOracle(
            max_trials=search.max_trials,
            num_initial_points=b.num_initial_points,
            alpha=b.alpha,
            beta=b.beta,
            **common,
        )
        oracle.penalty = search.penalty
        return oracle
    hb = search.hyperband
    oracle = HyperbandOracle(
        max_epochs=hb.max_epochs, factor=hb.factor, hyperband_iterations=hb.iterations, **common
    )
    # Hyperband sizes its brackets from max_epochs; max_trials caps the total on top of that.
    oracle.max_trials = search.max_trials
    return oracle


def constraint_violation(probe, constraints) -> str | None:
    """Why a probed model cannot meet the constraints, or None."""
    if constraints.max_params is not None and probe.params > constraints.max_params:
        return f"params {probe.params:,} > max_params {constraints.max_params:,}"
    if constraints.min_speed is not None and probe.speed < constraints.min_speed:
        return f"speed {probe.speed:.1f}x < min_speed {constraints.min_speed:g}x"
    return None


def trial_train_config(base: TrainConfig, arch: dict, values: dict, epochs: int) -> TrainConfig:
    """The trainer's recipe for one trial: the base recipe with this architecture, learning
    rate and length."""
    blocks = {k: v for k, v in arch.items() if k.startswith("stackwise_")}
    overrides = {k: v for k, v in arch.items() if not k.startswith("stackwise_")}
    data = base.to_dict()
    data["model"] = {"preset": None, "blocks": blocks, "overrides": overrides}
    data["optimizer"]["learning_rate"] = float(values["learning_rate"])
    data["training"]["epochs"] = int(epochs)
    return TrainConfig.from_dict(data)


def _write_json(path: Path, data: dict):
    # Trial records may hold objects of Keras Tuner's; their text is what the record wants.
    files.write_text(path, json.dumps(data, indent=1, default=str))


def read_trial_record(trial_dir) -> dict:
    path = Path(trial_dir) / TRIAL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class QuartzNetTuner(kt.Tuner):
    """A ``keras_tuner.Tuner`` whose trials are runs of the project's trainer.

    Args:
        oracle: from :func:`make_oracle`.
        config: the :class:`~qn_keras.tuning.config.TuneConfig`.
        vocabulary_size, num_features: of the models (from the labels and the front end).
        directory, project_name: the Keras Tuner project folder (shared by chief and workers).
        overwrite: start afresh instead of resuming an existing project.
        progress: show the trainer's progress bars.

    ``search(train, val)`` takes paths (manifest or ``qn features`` folder), opened once, at
    the first trial that gets trained (so a chief, or a search whose trials are all pruned,
    never featurizes anything), into ``cache_dir``; or ready
    :class:`~qn_keras.training.data.DataSource` objects.
    """

    def __init__(
        self,
        oracle,
        config: TuneConfig,
        *,
        vocabulary_size: int = 29,
        num_features: int = 64,
        directory=None,
        project_name="search",
        overwrite=False,
        progress=False,
        cache_dir=None,
    ):
        self.config = config
        self.progress = progress
        self.cache_dir = cache_dir
        self.sources = None
        hypermodel = QuartzNetHyperModel(config.space, vocabulary_size, num_features)
        super().__init__(
            oracle=oracle,
            hypermodel=hypermodel,
            directory=directory,
            project_name=project_name,
            overwrite=overwrite,
        )

    def _populate_initial_space(self):
        # The space has no conditional parameters: declaring it is enough, and spares the
        # base class building a model just to discover them.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def open_data(self, train, val):
        """The (train, val) DataSources, featurized once per tuner and then reused."""
        if self.sources is None:
            from qn_keras.training import data as data_lib

            if isinstance(train, data_lib.DataSource) and isinstance(val, data_lib.DataSource):
                self.sources = (train, val)
            else:
                train_config = self.config.train
                tokenizer = train_config.tokenizer()
                featurizer = train_config.featurizer_config()
                cache = self.cache_dir or os.path.join(self.project_dir, "cache", self.tuner_id)
                self.sources = (
                    data_lib.open_data(
                        train,
                        tokenizer,
                        featurizer,
                        cache,
                        max_duration=train_config.data.max_duration,
                        progress=self.progress,
                    ),
                    data_lib.open_data(val, tokenizer, featurizer, cache, progress=self.progress),
                )
        return self.sources

    def trial_values(self, trial) -> dict:
        return {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}

    def run_trial(self, trial, train_data, val_data):
        from qn_keras.training.trainer import Trainer, TrainingDivergedError

        objective = self.oracle.objective.name
        values = self.trial_values(trial)
        hp_values = trial.hyperparameters.values
        trial_dir = Path(self.get_trial_dir(trial.trial_id))
        arch = self.hypermodel.architecture(values)
        epochs = int(hp_values.get("tuner/epochs", self.config.train.training.epochs))
        initial_epoch = int(hp_values.get("tuner/initial_epoch", 0))
        parent = hp_values.get("tuner/trial_id")
        record = {
            "trial_id": trial.trial_id,
            "tuner_id": self.tuner_id,
            "status": "running",
            "architecture": describe(values),
            "hyperparameters": values,
            "epochs": epochs,
            "parent_trial_id": parent,
            "started": time.time(),
        }
        previous = read_trial_record(trial_dir)
        record["attempts"] = int(previous.get("attempts", 0)) + 1

        tf.keras.backend.clear_session()
        constraints = self.config.constraints
        model = self.hypermodel.build(trial.hyperparameters)
        probe = probe_model(model, time_it=False)
        reason = constraint_violation(probe, constraints)
        if reason is None:
            probe = probe_model(model, constraints.probe_seconds, constraints.probe_repeats)
            reason = constraint_violation(probe, constraints)
        del model
        record.update(probe.to_dict())
        if reason is not None:
            record.update(status="infeasible", reason=reason, finished=time.time())
            _write_json(trial_dir / TRIAL_FILE, record)
            print(f"Trial {trial.trial_id} infeasible, not trained: {reason}")
            return {objective: self.config.search.penalty}
        _write_json(trial_dir / TRIAL_FILE, record)

        init_from = None
        train_epochs = epochs
        if parent is not None:
            parent_model = Path(self.get_trial_dir(parent)) / TRAIN_DIR / "model"
            if parent_model.is_dir():
                # Hyperband's next round: continue the parent's best model for the epochs it
                # has not had yet.
                init_from = parent_model
                train_epochs = max(1, epochs - initial_epoch)
        train_config = trial_train_config(self.config.train, arch, values, train_epochs)
        train_source, val_source = self.open_data(train_data, val_data)
        started = time.monotonic()
        try:
            result = Trainer(
                train_config,
                trial_dir / TRAIN_DIR,
                train_source,
                val_source,
                init_from=init_from,
                progress=self.progress,
                export_serving=False,
            ).fit()
        except TrainingDivergedError as e:
            # A learning rate too high for this model is a bad result, not a broken search.
            record.update(status="diverged", reason=str(e).split(";")[0], finished=time.time())
            _write_json(trial_dir / TRIAL_FILE, record)
            return {objective: self.config.search.penalty}
        finally:
            gc.collect()
        best = result.best or result.final
        if best is None:
            raise RuntimeError(f"Trial {trial.trial_id}: the trainer reported no validation.")
        record.update(
            status="completed",
            val_wer=float(best["wer"]),
            val_cer=float(best["cer"]),
            val_loss=float(best["loss"]),
            best_step=int(best["step"]),
            steps=int(result.steps),
            train_seconds=time.monotonic() - started,
            # Relative, so the project folder can be moved or mounted elsewhere.
            model_dir=os.path.relpath(result.model_dir, trial_dir) if result.model_dir else None,
            finished=time.time(),
        )
        _write_json(trial_dir / TRIAL_FILE, record)
        return {"val_wer": record["val_wer"], "val_loss": record["val_loss"]}

    def load_model(self, trial):
        from qn_keras.model_dir import load_model_dir

        record = read_trial_record(self.get_trial_dir(trial.trial_id))
        if not record.get("model_dir"):
            raise ValueError(
                f"Trial {trial.trial_id} has no trained model ({record.get('status')})."
            )
        return load_model_dir(Path(self.get_trial_dir(trial.trial_id)) / record["model_dir"]).model

    def save_model(self, trial_id, model, step=0):
        # The trainer already keeps each trial's best model in trial_<id>/train/model.
        pass
