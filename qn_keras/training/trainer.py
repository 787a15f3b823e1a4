"""CTC training of QuartzNet models: NeMo's recipe, any number of devices, resumable.

The Trainer runs the loop; each job around it has its own module: what the run is
(:mod:`.run_setup`, :mod:`.initialization` for ``--init``), devices (:mod:`.distribution`),
optimizer and schedule (:mod:`.optimizers`), one step on every replica (:mod:`.step`), the
loop's state (:mod:`.loop_state`), and the report and curves (:mod:`.report`). This module is
about 650 lines because the loop, its checkpointing, validation and export read best together.

Fault tolerance: ``tf.train.Checkpoint`` (model, optimizer with its NovoGrad slots and step
counter, and the position in the epoch) every ``checkpoint_every_steps`` steps and at each
epoch end. Every epoch reads a freshly built dataset shuffled with ``seed + epoch`` in a
deterministic order, and augmentation draws are stateless functions of ``(seed, step,
replica)``, so a run killed at any point and started again with the same command continues
from the last checkpoint as if it had not stopped.

Inputs are checked before they are trained on: the reader validates every record as it parses
it (finite features, lengths that match the tensors, label ids inside the vocabulary) and a bad
one stops the run with :class:`~qn_keras.data.validation.CorruptRecordError` naming the
utterance and its shard, before the step that would use it. NaN cannot be relied on to reach
the loss (oneDNN's fused BatchNorm+ReLU maps it to 0; see :mod:`qn_keras.data.validation`).
The loss and the gradient norm are also checked every step: NaN or infinity stops the run with
:class:`TrainingDivergedError` before anything is saved.

Outputs in ``out_dir``::

    model/                 best model by validation WER (model folder with serving SavedModel)
    training_report.json   config, data, steps, time, throughput, final and best metrics
    curves.png             loss and WER curves
    history.json           logged training loss and every validation
    checkpoints/           tf.train.Checkpoint files, best_model/ (best so far, no SavedModel)
    tensorboard/           TensorBoard logs
    run.json               resolved architecture, labels and front end (for resuming)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras import files
from qn_keras.choices import HEAD_LAYER
from qn_keras.data import reader
from qn_keras.errors import UserInputError
from qn_keras.featurizer import FeaturizerConfig
from qn_keras.model_dir import ModelBundle, is_model_dir, load_model_dir, save_model_dir
from qn_keras.presets import build_from_architecture, with_vocabulary
from qn_keras.quartznet_ctc import find_layer
from qn_keras.streaming.normalization import METADATA_KEY as PRIOR_KEY
from qn_keras.tokenizer import CharTokenizer
from qn_keras.training import data as data_lib
from qn_keras.training.augment import augment_batch
from qn_keras.training.config import TrainConfig
from qn_keras.training.distribution import any_worker, make_strategy, worker_role
from qn_keras.training.evaluation import evaluate, make_eval_step
from qn_keras.training.initialization import checkpoint_has, copy_weights
from qn_keras.training.loop_state import LoopState, validations_without_improvement
from qn_keras.training.optimizers import make_optimizer, make_schedule, time_horizon
from qn_keras.training.report import build_report, plot_curves
from qn_keras.training.run_files import (
    BEST_DIR,
    CHECKPOINT_DIR,
    CURVES_FILE,
    HISTORY_FILE,
    MODEL_DIR,
    REPORT_FILE,
)
from qn_keras.training.run_setup import resolve_run, write_run_file
from qn_keras.training.step import make_train_step

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The training loss or gradients became NaN or infinite; nothing from that step was
    saved."""


def _checked_batches(dataset):
    """Iterates ``dataset``; a record the reader found unusable raises CorruptRecordError
    (naming it) when its batch is due, before any step trains on it."""
    iterator = iter(dataset)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            reader.raise_corrupt_record(e)
        yield batch


@dataclasses.dataclass
class TrainingResult:
    """What :meth:`Trainer.fit` returns; ``report`` is ``training_report.json``'s content."""

    out_dir: Path
    model_dir: Path | None
    steps: int
    stopped_reason: str
    best: dict | None
    final: dict | None
    report: dict


WALL_KEY = "wall_seconds"


class Trainer:
    """Trains a QuartzNet CTC model from a :class:`TrainConfig`.

    Args:
        config: the recipe.
        out_dir: output folder; a folder holding checkpoints of the same run is resumed.
        train_data: a :class:`~qn_keras.training.data.DataSource`, or a path (``qn features``
            folder, TFRecord file or manifest).
        val_data: the same for validation, or None (no validation: the last model is kept).
        init_from: a model folder or a training run/checkpoint to start from (fine-tuning).
            Its architecture is used; with other labels than its own the CTC head is
            re-initialized and the encoder kept.
        strategy: a ``tf.distribute`` strategy (default :func:`make_strategy`).
        progress: show a tqdm progress bar and print messages.
        export_serving: also write the serving SavedModel into ``model/``.
        model_fn: optional ``model -> model`` applied to the built model once its initial
            weights are in place, before training (e.g. wrapping it for quantization-aware
            training or pruning with tfmot); the evaluation copy is built the same way, and the
            exported model is the wrapped one.
        augment: the batch augmentation, ``(features, lengths, augment_config, seed) ->
            features``, traced into the training step only (default SpecAugment/SpecCutout).
        clock: seconds for ``max_minutes`` and the wall time kept across resumes (default
            ``time.monotonic``; tests pass their own).

    Example:
        >>> config = load_config("configs/demo.yaml")  # doctest: +SKIP
        >>> result = Trainer(config, "runs/x", "train.json", "dev.json").fit(max_minutes=5)  # doctest: +SKIP
        >>> result.best["wer"]  # doctest: +SKIP
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir,
        train_data,
        val_data=None,
        *,
        init_from=None,
        strategy=None,
        progress: bool = True,
        export_serving: bool = True,
        model_fn=None,
        augment=augment_batch,
        clock=time.monotonic,
    ):
        self.config = config.validate()
        self._augment = augment
        self._clock = clock
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.export_serving = export_serving
        self.model_fn = model_fn
        self.strategy = strategy or make_strategy()
        self.is_chief, self.worker_name = worker_role(self.strategy)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._previous_policy = tf.keras.mixed_precision.global_policy()
        tf.keras.mixed_precision.set_global_policy(config.training.precision)
        try:
            self._setup(train_data, val_data, init_from)
        except BaseException:
            tf.keras.mixed_precision.set_global_policy(self._previous_policy)
            raise

    # ----------------------------------------------------------------------------- setup

    def _say(self, message: str) -> None:
        logger.info(message)
        if self.progress and self.is_chief:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def _setup(self, train_data, val_data, init_from):
        config = self.config
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        run = resolve_run(config, self.out_dir, init_from, is_chief=self.is_chief, say=self._say)
        run = self._with_front_end_prior(run, train_data)
        self.init = run.init
        self.tokenizer = CharTokenizer(run.labels)
        self.featurizer = FeaturizerConfig.from_dict(run.featurizer)
        self.featurizer_arrays = run.featurizer_arrays
        self.architecture = with_vocabulary(run.architecture, self.tokenizer.vocabulary_size)

        cache_dir = self.out_dir / "cache" / self.worker_name
        max_duration = config.data.max_duration
        self.train_data = self._open(train_data, cache_dir, max_duration)
        self.val_data = self._open(val_data, cache_dir, None) if val_data is not None else None

        replicas = self.strategy.num_replicas_in_sync
        self.global_batch_size = config.data.batch_size * replicas
        # Uneven splits of a last partial batch would hand a replica an empty batch, whose
        # BatchNorm statistics are NaN; with several replicas every batch is full.
        self.drop_remainder = replicas > 1
        self.steps_per_epoch = data_lib.steps_per_epoch(
            self.train_data.num_utterances, self.global_batch_size
        )
        self.train_buckets = self.train_data.bucket_boundaries(config.data.bucket_boundaries)

        if self.is_chief:
            write_run_file(self.out_dir, config, run)
        self._resuming = run.resuming

    def _with_front_end_prior(self, run, train_data):
        """A front end that normalizes causally (``featurizer.normalize: adaptive``, a model
        trained for streaming) without a prior gets one from the training audio, before any
        features are made with it."""
        featurizer = FeaturizerConfig.from_dict(run.featurizer)
        if not featurizer.causal or featurizer.prior_mean is not None:
            return run
        from qn_keras.featurizer import LogMelSpectrogram
        from qn_keras.streaming.prior import training_prior

        path = train_data.path if isinstance(train_data, data_lib.DataSource) else train_data
        plain = {**featurizer.to_dict(), "normalize": "per_feature"}
        prior = training_prior(path, LogMelSpectrogram(**plain))
        self._say(
            f"Front-end prior for {featurizer.normalize} normalization: {prior.utterances} files"
        )
        featurizer = dataclasses.replace(featurizer, prior_mean=prior.mean, prior_std=prior.std)
        return dataclasses.replace(run, featurizer=featurizer.to_dict())

    def _open(self, data, cache_dir, max_duration):
        if isinstance(data, data_lib.DataSource):
            data.check_compatible(self.tokenizer, self.featurizer)
            return data
        return data_lib.open_data(
            data,
            self.tokenizer,
            self.featurizer,
            cache_dir,
            max_duration=max_duration,
            progress=self.progress and self.is_chief,
        )

    def _build_state(self, total_steps: int, movable_horizon: bool = False):
        config = self.config
        # The same seed gives the same initial weights (and Python/NumPy draws).
        tf.keras.utils.set_random_seed(config.training.seed)
        with self.strategy.scope():
            self.model = self._build_model(initialize=not self._resuming)
            self.schedule = make_schedule(config, total_steps, movable=movable_horizon)
            self.optimizer = make_optimizer(config, self.schedule)
            inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
            # Slots exist before restoring or tracing, so the checkpoint restores them eagerly
            # and neither train step function creates variables.
            inner._create_all_weights(self.model.trainable_variables)
            self.epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.batch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
            # Wall-clock seconds of training so far, so that training.max_minutes is one budget
            # across kills and resumes (a killed tuner trial does not get its minutes again).
            self.wall_var = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="wall_seconds")
        tracked = dict(
            model=self.model,
            optimizer=self.optimizer,
            epoch=self.epoch_var,
            batch_in_epoch=self.batch_var,
        )
        if checkpoint_has(self.checkpoint_dir, WALL_KEY) or not self._resuming:
            tracked[WALL_KEY] = self.wall_var  # checkpoints written before it existed lack it
        self.checkpoint = tf.train.Checkpoint(**tracked)
        directory = self.checkpoint_dir if self.is_chief else self._scratch_checkpoint_dir()
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(directory), max_to_keep=config.training.keep_checkpoints
        )
        # With several replicas validation and export use a plain copy: reading distributed
        # variables batch after batch would cost cross-device (collective) reads.
        if self.strategy.num_replicas_in_sync > 1:
            self.eval_model = self._build_model(initialize=False)
        else:
            self.eval_model = self.model
        self._eval_step = make_eval_step(self.eval_model)
        head = find_layer(self.model, HEAD_LAYER)
        self._head_variables = head.trainable_variables

    def _scratch_checkpoint_dir(self) -> Path:
        # Every worker must take part in saving; only the chief's copy is kept.
        return Path(tempfile.mkdtemp(prefix=f"qn-ckpt-{self.worker_name}-"))

    def _build_model(self, initialize: bool) -> tf.keras.Model:
        model = build_from_architecture(self.architecture)
        if self.model_fn is None:
            return model
        # Wrappers copy the weights they wrap: the initial weights go in first.
        if initialize:
            self._initialize_weights(model)
        return self.model_fn(model)

    def _initialize_weights(self, target=None):
        init = self.init
        if init is None:
            return
        head_changed = tuple(init.labels) != tuple(self.tokenizer.labels)
        if init.model is not None:
            source = init.model
        else:
            source = build_from_architecture(
                with_vocabulary(init.architecture, len(init.labels) + 1)
            )
            tf.train.Checkpoint(model=source).restore(init.checkpoint).expect_partial()
        skip = (HEAD_LAYER,) if head_changed else ()
        with self.strategy.scope():
            copy_weights(source, self.model if target is None else target, skip=skip)
        note = " (new vocabulary: CTC head re-initialized, encoder kept)" if head_changed else ""
        self._say(f"Initialized from {init.description}{note}.")

    # ----------------------------------------------------------------------------- steps

    def _make_train_step(self, head_only: bool):
        return make_train_step(
            self.model,
            self.optimizer,
            self.strategy,
            self._head_variables if head_only else self.model.trainable_variables,
            augment=self._augment,
            augment_config=self.config.augment,
            seed=int(self.config.training.seed),
        )

    # ----------------------------------------------------------------------------- fit

    def fit(self, *, max_steps: int | None = None, max_minutes: float | None = None):
        """Trains until ``epochs``, ``max_steps`` or ``max_minutes`` (these override the
        config's ``training.max_steps`` / ``training.max_minutes``), early stopping or
        divergence; exports the best model and writes the report. Returns a
        :class:`TrainingResult`."""
        try:
            return self._fit(max_steps, max_minutes)
        finally:
            tf.keras.mixed_precision.set_global_policy(self._previous_policy)

    def _fit(self, max_steps, max_minutes):
        cfg = self.config.training
        max_steps = max_steps or cfg.max_steps
        max_minutes = max_minutes or cfg.max_minutes
        epoch_steps = cfg.epochs * self.steps_per_epoch
        # The schedule's horizon; epochs end when their data does (bucketing makes the count
        # an estimate), only an explicit max_steps stops mid-epoch.
        total_steps = min(max_steps, epoch_steps) if max_steps else epoch_steps
        by_time = time_horizon(self.config, max_minutes)
        self._build_state(total_steps, movable_horizon=by_time)
        state, spent_before = self._start_state()
        writer = (
            tf.summary.create_file_writer(str(self.out_dir / "tensorboard"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
        step_makers = {False: self._make_train_step(False)}
        if cfg.freeze_encoder_steps and state.start_step < cfg.freeze_encoder_steps:
            step_makers[True] = self._make_train_step(True)
        steps = {}
        started = self._clock()

        def wall_seconds():
            """Training wall time including the runs this one resumes."""
            return spent_before + self._clock() - started

        first_step = state.step

        def move_horizon():
            """The step at which the time budget runs out at this run's pace so far
            (validation and checkpoints included), never past the step or epoch bound."""
            done = state.step - first_step
            if not by_time or done < 1:
                return
            pace = (self._clock() - started) / done
            left = max(max_minutes * 60 - wall_seconds(), 0.0)
            self.schedule.move_horizon(min(state.step + left / max(pace, 1e-9), total_steps))

        bar = None
        try:
            epoch = int(self.epoch_var.numpy())
            stop = bool(max_steps) and state.step >= max_steps
            while epoch < cfg.epochs and not stop:
                skip = int(self.batch_var.numpy())
                dist = self._epoch_batches(epoch, skip)
                bar = self._progress_bar(epoch, skip)
                batch_index = skip
                for batch in _checked_batches(dist):
                    head_only = state.step < cfg.freeze_encoder_steps
                    if head_only not in steps:
                        steps[head_only] = step_makers[head_only](dist.element_spec)
                    out_of_time = max_minutes is not None and wall_seconds() > max_minutes * 60
                    t0, cpu0 = time.monotonic(), time.process_time()
                    totals = steps[head_only](
                        batch, tf.constant(state.step, tf.int64), tf.constant(float(out_of_time))
                    )
                    loss, count, frames, stop_votes, grad_norm = (float(v) for v in totals.numpy())
                    self._check_finite(loss, grad_norm, state.step + 1, epoch)
                    state.record_step(
                        loss, time.monotonic() - t0, count, frames, time.process_time() - cpu0
                    )
                    batch_index += 1
                    self.batch_var.assign(batch_index)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{np.mean(state.window_losses[-20:]):.2f}",
                            wer=f"{state.best['wer']:.1%}" if state.best else "-",
                            utt_s=f"{state.utterances_per_second():.1f}",
                        )
                    if state.step % cfg.log_every_steps == 0:
                        move_horizon()
                        self._log_train(state, epoch, writer)
                    if cfg.validate_every_steps and state.step % cfg.validate_every_steps == 0:
                        self._validate_step(state, epoch, writer)
                    if state.step % cfg.checkpoint_every_steps == 0:
                        self._checkpoint(
                            state, f"every {cfg.checkpoint_every_steps} steps", wall_seconds
                        )
                    if stop_votes > 0:
                        state.stopped_reason, stop = "max_minutes", True
                    elif max_steps and state.step >= max_steps:
                        state.stopped_reason, stop = "max_steps", True
                    if stop:
                        break
                if bar is not None:
                    bar.close()
                    bar = None
                if not stop:
                    epoch += 1
                    self.epoch_var.assign(epoch)
                    self.batch_var.assign(0)
                if state.last_val_step != state.step:
                    self._validate_step(state, epoch - (0 if stop else 1), writer)
                self._checkpoint(
                    state, "end of epoch" if not stop else state.stopped_reason, wall_seconds
                )
                if not stop and self._early_stop(state.history, state.best):
                    state.stopped_reason, stop = "early_stopping", True
                    self._say(
                        f"Early stopping: no WER improvement in {cfg.early_stopping_patience} "
                        "validations."
                    )
        finally:
            if bar is not None:
                bar.close()
            writer.flush()

        if state.last_val_step != state.step and state.step > state.start_step:
            self._validate_step(state, int(self.epoch_var.numpy()), writer)
        elapsed = self._clock() - started
        if state.best is None:
            self._sync_eval_model()  # every worker takes part (collective reads)
        model_dir = self._export(state.best) if self.is_chief else None
        final = state.history["val"][-1] if state.history["val"] else None
        report = build_report(self, state, final, elapsed)
        if self.is_chief:
            files.write_json(self.out_dir / HISTORY_FILE, state.history)
            files.write_json(self.out_dir / REPORT_FILE, report)
            try:
                plot_curves(state.history, self.out_dir / CURVES_FILE)
            except Exception as e:  # a missing plot must not cost the trained model
                self._say(f"Could not draw {CURVES_FILE}: {e}")
        return TrainingResult(
            out_dir=self.out_dir,
            model_dir=model_dir,
            steps=state.step,
            stopped_reason=state.stopped_reason,
            best=state.best,
            final=final,
            report=report,
        )

    def _start_state(self) -> tuple[LoopState, float]:
        """A fresh loop state, or the resumed run's (restored checkpoint, its history up to the
        checkpoint's step, the wall time trained before); also puts the initial weights in."""
        history = {"train": [], "val": []}
        start_step, spent_before = 0, 0.0
        if self._resuming:
            latest = tf.train.latest_checkpoint(str(self.checkpoint_dir))
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            start_step = int(self.optimizer.iterations.numpy())
            spent_before = float(self.wall_var.numpy())
            history_path = self.out_dir / HISTORY_FILE
            if history_path.is_file():
                saved = json.loads(history_path.read_text())
                history = {
                    k: [h for h in saved.get(k, []) if h["step"] <= start_step] for k in history
                }
            self._say(
                f"Resuming from {latest}: step {start_step}, epoch {int(self.epoch_var.numpy()) + 1}, "
                f"batch {int(self.batch_var.numpy())} of the epoch"
                + (f", {spent_before / 60:.1f} min trained before." if spent_before else ".")
            )
        elif self.model_fn is None:  # with model_fn, _build_model did it before wrapping
            self._initialize_weights()
        state = LoopState(
            step=start_step,
            start_step=start_step,
            history=history,
            best=self._read_best(),
            last_val_step=history["val"][-1]["step"] if history["val"] else None,
            last_checkpoint_step=start_step if self._resuming else None,
        )
        return state, spent_before

    def _epoch_batches(self, epoch: int, skip: int):
        """The epoch's distributed dataset, past the ``skip`` batches a resumed run has done."""
        dataset = self.train_data.dataset(
            self.global_batch_size,
            training=self.config.data.shuffle,
            seed=self.config.training.seed,
            epoch=epoch,
            bucket_boundaries=self.train_buckets,
            drop_remainder=self.drop_remainder,
            num_labels=len(self.tokenizer.labels),
        )
        if skip:
            dataset = dataset.skip(skip)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return self.strategy.experimental_distribute_dataset(dataset.with_options(options))

    def _check_finite(self, loss: float, grad_norm: float, step: int, epoch: int) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        raise TrainingDivergedError(
            f"Training {what} became {value} at step {step} (epoch {epoch + 1}); "
            "stopped without saving that step. The last checkpoint "
            f"({self.manager.latest_checkpoint or 'none'}) is intact: lower "
            "optimizer.learning_rate, add schedule warmup, or use float32."
        )

    def _log_train(self, state: LoopState, epoch: int, writer) -> None:
        lr = float(self.schedule(state.step - 1))
        entry = state.log_window(epoch, lr)
        with writer.as_default(step=state.step):
            tf.summary.scalar("train/loss", entry["loss"])
            tf.summary.scalar("train/learning_rate", lr)
            tf.summary.scalar("train/utterances_per_second", state.utterances_per_second())

    def _validate_step(self, state: LoopState, epoch: int, writer):
        """Validates; keeps the model if it is the best so far. None without validation data."""
        metrics = self._validate()
        if metrics is None:
            return None
        entry, improved = state.add_validation(epoch, metrics)
        with writer.as_default(step=state.step):
            for key in ("loss", "wer", "cer"):
                tf.summary.scalar(f"val/{key}", metrics[key])
        if improved:
            self._save_best(entry)
        best = state.best
        self._say(
            f"step {state.step} (epoch {epoch + 1}): val loss {metrics['loss']:.3f}, "
            f"WER {metrics['wer']:.2%}, CER {metrics['cer']:.2%}"
            + (" (best)" if improved else f" (best {best['wer']:.2%} at step {best['step']})")
        )
        return entry

    def _checkpoint(self, state: LoopState, reason: str, wall_seconds) -> None:
        if state.last_checkpoint_step == state.step:
            return
        state.last_checkpoint_step = state.step
        self.wall_var.assign(wall_seconds())
        path = self.manager.save(checkpoint_number=state.step)
        if not self.is_chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)
        if self.is_chief:
            files.write_json(self.out_dir / HISTORY_FILE, state.history)
        self._say(f"checkpoint saved at step {state.step} ({reason}): {path}")

    def _progress_bar(self, epoch, skip):
        if not (self.progress and self.is_chief):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.steps_per_epoch,
            initial=min(skip, self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{self.config.training.epochs}",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def _early_stop(self, history, best) -> bool:
        cfg = self.config.training
        if not cfg.early_stopping_patience or best is None:
            return False
        stale = validations_without_improvement(
            [entry["wer"] for entry in history["val"]], cfg.early_stopping_min_delta
        )
        return any_worker(self.strategy, stale >= cfg.early_stopping_patience)

    # ----------------------------------------------------------------------------- io

    def _sync_eval_model(self):
        if self.eval_model is not self.model:
            self.eval_model.set_weights(self.model.get_weights())

    def _validate(self):
        if self.val_data is None:
            return None
        self._sync_eval_model()
        dataset = self.val_data.dataset(
            self.config.data.eval_batch_size,
            training=False,
            with_metadata=True,
            num_labels=len(self.tokenizer.labels),
        )
        try:
            result = evaluate(
                self.eval_model,
                dataset,
                self.tokenizer,
                keep_utterances=False,
                step=self._eval_step,
            )
        except tf.errors.InvalidArgumentError as e:
            reader.raise_corrupt_record(e)
        return {"loss": result.loss, "wer": result.wer, "cer": result.cer}

    def _bundle(self, model, metadata) -> ModelBundle:
        return ModelBundle(
            model=model,
            tokenizer=self.tokenizer,
            featurizer=self.featurizer,
            metadata=metadata,
            **self.featurizer_arrays,
        )

    def _save_best(self, entry):
        if not self.is_chief:
            return
        metadata = {"trained_by": "qn train", "best": entry, "config": self.config.to_dict()}
        save_model_dir(
            self.checkpoint_dir / BEST_DIR, self._bundle(self.eval_model, metadata), serving=False
        )

    def _read_best(self):
        path = self.checkpoint_dir / BEST_DIR
        if is_model_dir(path):
            meta = json.loads((path / "qn_model.json").read_text())
            return meta.get("metadata", {}).get("best")
        return None

    def _feature_prior(self, bundle):
        """The training audio's feature prior, for streaming (qn_keras.streaming): estimated
        from the source files of up to 200 training records; None (said) if unreadable."""
        from qn_keras.streaming.normalization import FeaturePrior
        from qn_keras.streaming.prior import training_prior

        if bundle.featurizer.causal:  # estimated already, for the front end (_setup)
            return FeaturePrior(bundle.featurizer.prior_mean, bundle.featurizer.prior_std)
        try:
            return training_prior(self.train_data.path, bundle.featurizer_layer())
        except (UserInputError, OSError, tf.errors.OpError) as e:
            self._say(f"No feature prior for streaming ({e}); add one with `qn model prior`.")
            return None

    def _export(self, best) -> Path:
        """The best model (or the last one without validation) as ``out_dir/model``."""
        best_path = self.checkpoint_dir / BEST_DIR
        if best is not None and is_model_dir(best_path):
            model = load_model_dir(best_path).model
        else:
            model = self.eval_model
        metadata = {
            "trained_by": "qn train",
            "best": best,
            "config": self.config.to_dict(),
            "train_data": self.train_data.description,
        }
        bundle = self._bundle(model, metadata)
        prior = self._feature_prior(bundle)
        if prior is not None:
            metadata[PRIOR_KEY] = prior.to_dict()
        path = save_model_dir(self.out_dir / MODEL_DIR, bundle, serving=self.export_serving)
        self._say(f"Model written to {path}" + (f" (best WER {best['wer']:.2%})" if best else ""))
        return path


def train(config: TrainConfig, out_dir, train_data, val_data=None, **kwargs) -> TrainingResult:
    """Shortcut: ``Trainer(config, out_dir, train_data, val_data, **init_kwargs).fit(...)``;
    ``max_steps`` and ``max_minutes`` go to :meth:`Trainer.fit`, the rest to the Trainer."""
    fit_kwargs = {k: kwargs.pop(k) for k in ("max_steps", "max_minutes") if k in kwargs}
    return Trainer(config, out_dir, train_data, val_data, **kwargs).fit(**fit_kwargs)
