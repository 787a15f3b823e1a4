"""CTC training of QuartzNet models: NeMo's recipe, any number of devices, resumable.

One training step, per replica: SpecAugment/SpecCutout on the batch (training only), forward,
per-utterance CTC losses in float32, this replica's share of NeMo's ``mean_batch`` loss (its
sum over the *global* batch size, so the all-reduced gradient is the gradient of the global
mean), NovoGrad update (wrapped in a dynamic ``LossScaleOptimizer`` under ``mixed_float16``).

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
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras import files
from qn_keras.choices import HEAD_LAYER
from qn_keras.data import reader
from qn_keras.featurizer import FeaturizerConfig
from qn_keras.model_dir import ModelBundle, is_model_dir, load_model_dir, save_model_dir
from qn_keras.quartznet_ctc import find_layer
from qn_keras.tokenizer import CharTokenizer
from qn_keras.training import data as data_lib
from qn_keras.training.augment import augment_batch
from qn_keras.training.config import ConfigError, TrainConfig
from qn_keras.training.evaluation import evaluate, make_eval_step
from qn_keras.training.losses import ctc_per_utterance
from qn_keras.training.schedules import CosineAnnealing

logger = logging.getLogger(__name__)


CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best_model"
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"
REPORT_FILE = "training_report.json"
CURVES_FILE = "curves.png"
MODEL_DIR = "model"
FEATURIZER_ARRAYS_FILE = "featurizer_arrays.npz"
# Config keys that may change between a killed run and its restart (how long to go on).
RESTART_KEYS = {
    "training": (
        "epochs",
        "max_steps",
        "max_minutes",
        "early_stopping_patience",
        "early_stopping_min_delta",
        "validate_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "log_every_steps",
    )
}


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


def make_strategy(devices=None) -> tf.distribute.Strategy:
    """``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names several tasks, otherwise
    ``MirroredStrategy`` over ``devices`` (default: every visible GPU, or the CPU)."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = tf_config.get("cluster", {})
    tasks = sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
    if tasks > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy(devices)


def strategy_name(strategy) -> str:
    """The public ``tf.distribute`` name (MultiWorkerMirroredStrategy's class is
    ``CollectiveAllReduceStrategy``)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def _worker_role(strategy) -> tuple[bool, str]:
    """(is_chief, a name for this worker's private files)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if task_type is None:
        return True, "chief"
    has_chief = "chief" in (resolver.cluster_spec().as_dict() if resolver else {})
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return chief, f"{task_type}_{task_id}"


def _restart_view(config: dict) -> dict:
    view = json.loads(json.dumps(config))
    for section, keys in RESTART_KEYS.items():
        for key in keys:
            view.get(section, {}).pop(key, None)
    return view


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


def make_schedule(config: TrainConfig, total_steps: int):
    """The configured learning-rate schedule over ``total_steps`` (unless the config fixes
    ``schedule.max_steps``)."""
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
    )


WALL_KEY = "wall_seconds"


def _checkpoint_has(directory, name: str) -> bool:
    """Whether the latest checkpoint in ``directory`` holds the top-level object ``name``."""
    latest = tf.train.latest_checkpoint(str(directory))
    if latest is None:
        return False
    return any(key.split("/")[0] == name for key, _ in tf.train.list_variables(latest))


def _find_checkpoint(path: Path) -> str | None:
    """The newest checkpoint prefix in a run folder, a checkpoints folder, or a prefix."""
    for folder in (path / CHECKPOINT_DIR, path):
        if folder.is_dir():
            latest = tf.train.latest_checkpoint(str(folder))
            if latest:
                return latest
    if tf.io.gfile.exists(str(path) + ".index"):
        return str(path)
    return None


@dataclasses.dataclass
class _Init:
    """Where the initial weights come from (``--init``)."""

    architecture: dict
    labels: tuple
    featurizer: dict
    model: tf.keras.Model | None = None
    checkpoint: str | None = None
    description: str = ""
    # An imported model's own front-end arrays (ModelBundle.filterbank / window), kept in the
    # exported model folder.
    featurizer_arrays: dict = dataclasses.field(default_factory=dict)


def load_initialization(path) -> _Init:
    """Reads ``--init``: a model folder (``qn train`` output ``model/``, ``qn import-nemo``), or
    a training run's folder / checkpoint (its ``run.json`` gives the architecture)."""
    path = Path(path)
    if not path.exists() and not tf.io.gfile.exists(str(path) + ".index"):
        raise FileNotFoundError(f"--init: not found: {path}")
    if is_model_dir(path):
        bundle = load_model_dir(path)
        return _Init(
            architecture=bundle.model.get_config(),
            labels=tuple(bundle.tokenizer.labels),
            featurizer=bundle.featurizer.to_dict(),
            model=bundle.model,
            description=f"model folder {path}",
            featurizer_arrays={
                k: getattr(bundle, k)
                for k in ("filterbank", "window")
                if getattr(bundle, k, None) is not None
            },
        )
    checkpoint = _find_checkpoint(path)
    run_file = next(
        (p / RUN_FILE for p in (path, path.parent, path.parent.parent) if (p / RUN_FILE).is_file()),
        None,
    )
    if checkpoint is None or run_file is None:
        raise ValueError(
            f"--init {path} is neither a model folder (model.keras + qn_model.json) nor a "
            f"training run (a {CHECKPOINT_DIR}/ folder and {RUN_FILE})."
        )
    run = json.loads(run_file.read_text())
    return _Init(
        architecture=run["architecture"],
        labels=tuple(run["labels"]),
        featurizer=run["featurizer"],
        checkpoint=checkpoint,
        description=f"checkpoint {checkpoint}",
    )


def _architecture_with_vocabulary(architecture: dict, vocabulary_size: int) -> dict:
    architecture = dict(architecture)
    architecture["vocabulary_size"] = vocabulary_size
    return architecture


def _build_from_architecture(architecture: dict) -> tf.keras.Model:
    from qn_keras.quartznet_ctc import QuartzNetCTC

    return QuartzNetCTC.from_config(dict(architecture))


MODEL_ARGS = ("num_features", "activation", "kernel_size_factor", "se_reduction_ratio", "name")


def architecture_from_config(model_cfg) -> dict:
    """``QuartzNetCTC`` arguments (without ``vocabulary_size``) for a ``ModelConfig``, checked
    without building the model."""
    from qn_keras.presets import preset_kwargs
    from qn_keras.quartznet_backbone import STACKWISE_ARGS, normalize_block_lists

    kwargs = preset_kwargs(model_cfg.preset) if model_cfg.preset else {}
    kwargs.update(model_cfg.model_kwargs())
    unknown = sorted(set(kwargs) - set(STACKWISE_ARGS) - set(MODEL_ARGS))
    if unknown:
        raise ConfigError(
            f"model: unknown model argument(s) {unknown}. Known: "
            f"{sorted(STACKWISE_ARGS + MODEL_ARGS)}"
        )
    stackwise = {k: v for k, v in kwargs.items() if k in STACKWISE_ARGS}
    if not stackwise.get("stackwise_filters") or not stackwise.get("stackwise_kernel_sizes"):
        raise ConfigError(
            "model.blocks needs at least stackwise_filters and stackwise_kernel_sizes."
        )
    try:
        blocks = normalize_block_lists(**stackwise)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    others = {k: v for k, v in kwargs.items() if k in MODEL_ARGS}
    others.setdefault("name", model_cfg.preset or "quartznet")
    return {**others, **blocks}


def validations_without_improvement(wers, min_delta: float = 0.0) -> int:
    """Validations since the last one that beat every earlier WER by more than ``min_delta``."""
    since, best = 0, math.inf
    for wer in wers:
        if wer < best - min_delta:
            best, since = wer, 0
        else:
            since += 1
    return since


def copy_weights(source: tf.keras.Model, target: tf.keras.Model, skip=()) -> list[str]:
    """Copies weights layer by layer (matched by name) except layers in ``skip``; returns the
    copied layer names. ValueError when a layer is missing or its weights differ in shape."""
    copied = []
    for layer in target.layers:
        if layer.name in skip or not layer.weights:
            continue
        try:
            src = source.get_layer(layer.name)
        except ValueError:
            raise ValueError(f"The initial model has no layer {layer.name!r}.") from None
        weights = src.get_weights()
        shapes = [w.shape for w in weights]
        wanted = [tuple(w.shape) for w in layer.weights]
        if [tuple(s) for s in shapes] != wanted:
            raise ValueError(
                f"Layer {layer.name!r}: initial weights have shapes {shapes}, the model needs "
                f"{wanted}."
            )
        layer.set_weights(weights)
        copied.append(layer.name)
    return copied


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
    ):
        self.config = config.validate()
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.export_serving = export_serving
        self.model_fn = model_fn
        self.strategy = strategy or make_strategy()
        self.is_chief, self.worker_name = _worker_role(self.strategy)
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
        run_path = self.out_dir / RUN_FILE
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        resuming = tf.train.latest_checkpoint(str(self.checkpoint_dir)) is not None
        previous_run = json.loads(run_path.read_text()) if run_path.is_file() else None
        if resuming and previous_run is None:
            raise ValueError(
                f"{self.checkpoint_dir} has checkpoints but {run_path} is missing; use a new --out."
            )
        if previous_run is not None and resuming:
            if _restart_view(previous_run["config"]) != _restart_view(config.to_dict()):
                raise ConfigError(
                    f"{self.out_dir} holds a run with a different config; restart it with the "
                    "same config (only run-length settings may change) or use a new --out."
                )
            if init_from:
                self._say(f"Resuming {self.out_dir}: --init {init_from} is not used again.")
            self.init = None
            architecture = previous_run["architecture"]
            labels = tuple(previous_run["labels"])
            featurizer = previous_run["featurizer"]
        else:
            self.init = load_initialization(init_from) if init_from else None
            architecture, labels, featurizer = self._resolve_model_setup()
        self.tokenizer = CharTokenizer(labels)
        self.featurizer = FeaturizerConfig.from_dict(featurizer)
        self.featurizer_arrays = self._featurizer_arrays(resuming)
        self.architecture = _architecture_with_vocabulary(
            architecture, self.tokenizer.vocabulary_size
        )

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
            files.write_json(
                run_path,
                {
                    "config": config.to_dict(),
                    "architecture": architecture,
                    "labels": list(labels),
                    "featurizer": featurizer,
                },
            )
        self._resuming = resuming

    def _featurizer_arrays(self, resuming: bool) -> dict:
        """The initial model's own filterbank/window, saved beside the run for resuming."""
        path = self.out_dir / FEATURIZER_ARRAYS_FILE
        if not resuming:
            arrays = dict(self.init.featurizer_arrays) if self.init is not None else {}
            if self.is_chief:
                if arrays:
                    with files.atomic_path(path) as tmp:
                        np.savez(tmp, **arrays)
                elif path.exists():
                    path.unlink()
            return arrays
        if path.exists():
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        return {}

    def _resolve_model_setup(self):
        config = self.config
        if self.init is not None:
            architecture = dict(self.init.architecture)
            architecture.pop("vocabulary_size", None)
        else:
            architecture = architecture_from_config(config.model)
        if config.labels is not None:
            labels = tuple(config.tokenizer().labels)
        elif self.init is not None:
            labels = self.init.labels
        else:
            labels = tuple(CharTokenizer().labels)
        if config.featurizer or self.init is None:
            featurizer = config.featurizer_config().to_dict()
        else:
            featurizer = dict(self.init.featurizer)
        return architecture, labels, featurizer

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

    def _build_state(self, total_steps: int):
        config = self.config
        # The same seed gives the same initial weights (and Python/NumPy draws).
        tf.keras.utils.set_random_seed(config.training.seed)
        with self.strategy.scope():
            self.model = self._build_model(initialize=not self._resuming)
            self.schedule = make_schedule(config, total_steps)
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
        if _checkpoint_has(self.checkpoint_dir, WALL_KEY) or not self._resuming:
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
        model = _build_from_architecture(self.architecture)
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
            source = _build_from_architecture(
                _architecture_with_vocabulary(init.architecture, len(init.labels) + 1)
            )
            tf.train.Checkpoint(model=source).restore(init.checkpoint).expect_partial()
        skip = (HEAD_LAYER,) if head_changed else ()
        with self.strategy.scope():
            copy_weights(source, self.model if target is None else target, skip=skip)
        note = " (new vocabulary: CTC head re-initialized, encoder kept)" if head_changed else ""
        self._say(f"Initialized from {init.description}{note}.")

    # ----------------------------------------------------------------------------- steps

    def _make_train_step(self, head_only: bool):
        model, optimizer, strategy = self.model, self.optimizer, self.strategy
        augment_cfg = self.config.augment
        seed = int(self.config.training.seed)
        scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        variables = self._head_variables if head_only else model.trainable_variables

        def replica_step(batch, step, stop_flag):
            (features, feature_lengths), (labels, label_lengths) = batch
            ctx = tf.distribute.get_replica_context()
            local_count = tf.cast(tf.shape(features)[0], tf.float32)
            global_count = ctx.all_reduce("sum", local_count)
            replica_seed = tf.random.experimental.stateless_fold_in(
                tf.stack([tf.constant(seed, tf.int64), step]),
                tf.cast(ctx.replica_id_in_sync_group, tf.int64),
            )
            features = augment_batch(features, feature_lengths, augment_cfg, replica_seed)
            with tf.GradientTape() as tape:
                logprobs, logprob_lengths = model([features, feature_lengths], training=True)
                losses = ctc_per_utterance(labels, label_lengths, logprobs, logprob_lengths)
                loss = tf.reduce_sum(losses) / tf.maximum(global_count, 1.0)
                objective = optimizer.get_scaled_loss(loss) if scaled else loss
            grads = tape.gradient(objective, variables)
            if scaled:
                grads = optimizer.get_unscaled_gradients(grads)
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            frames = tf.cast(tf.reduce_sum(feature_lengths), tf.float32)
            # Summed over replicas, so a NaN or infinite gradient on any replica shows.
            grad_norm = tf.cast(tf.linalg.global_norm(grads), tf.float32)
            totals = ctx.all_reduce(
                "sum", tf.stack([loss, local_count, frames, stop_flag, grad_norm])
            )
            return totals

        def train_step(batch, step, stop_flag):
            totals = strategy.run(replica_step, args=(batch, step, stop_flag))
            return strategy.experimental_local_results(totals)[0]

        def compile_for(element_spec):
            # One trace for the dataset's element spec (time lengths vary batch to batch).
            signature = [
                element_spec,
                tf.TensorSpec([], tf.int64),
                tf.TensorSpec([], tf.float32),
            ]
            return tf.function(train_step, input_signature=signature)

        return compile_for

    def _agree(self, flag: bool) -> bool:
        """True if any worker passes True (so all workers take the same decision)."""
        if self.strategy.num_replicas_in_sync == 1:
            return flag

        def replica_fn(value):
            return tf.distribute.get_replica_context().all_reduce("sum", value)

        total = self.strategy.run(replica_fn, args=(tf.constant(float(flag)),))
        return float(self.strategy.experimental_local_results(total)[0]) > 0

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
        self._build_state(total_steps)

        history = {"train": [], "val": []}
        start_step = 0
        spent_before = 0.0
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

        best = self._read_best()
        writer = (
            tf.summary.create_file_writer(str(self.out_dir / "tensorboard"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
        step_makers = {False: self._make_train_step(False)}
        if cfg.freeze_encoder_steps and start_step < cfg.freeze_encoder_steps:
            step_makers[True] = self._make_train_step(True)
        steps = {}

        started = time.monotonic()

        def wall_seconds():
            """Training wall time including the runs this one resumes."""
            return spent_before + time.monotonic() - started

        step = start_step
        train_seconds = utterances = audio_frames = 0.0
        last_val_step = history["val"][-1]["step"] if history["val"] else None
        stopped_reason = "epochs"
        last_checkpoint_step = start_step if self._resuming else None
        timed_steps = 0
        step_times = []  # (seconds, utterances, frames, CPU seconds) of each timed step
        window_losses = []
        bar = None

        def validate(epoch):
            nonlocal best, last_val_step
            metrics = self._validate()
            if metrics is None:
                return None
            entry = {"step": step, "epoch": epoch, **metrics}
            history["val"].append(entry)
            last_val_step = step
            with writer.as_default(step=step):
                for key in ("loss", "wer", "cer"):
                    tf.summary.scalar(f"val/{key}", metrics[key])
            improved = best is None or metrics["wer"] < best["wer"]
            if improved:
                best = dict(entry)
                self._save_best(entry)
            self._say(
                f"step {step} (epoch {epoch + 1}): val loss {metrics['loss']:.3f}, "
                f"WER {metrics['wer']:.2%}, CER {metrics['cer']:.2%}"
                + (" (best)" if improved else f" (best {best['wer']:.2%} at step {best['step']})")
            )
            return entry

        def checkpoint(reason):
            nonlocal last_checkpoint_step
            if last_checkpoint_step == step:
                return
            last_checkpoint_step = step
            self.wall_var.assign(wall_seconds())
            path = self.manager.save(checkpoint_number=step)
            if not self.is_chief:
                shutil.rmtree(self.manager.directory, ignore_errors=True)
            if self.is_chief:
                files.write_json(self.out_dir / HISTORY_FILE, history)
            self._say(f"checkpoint saved at step {step} ({reason}): {path}")

        try:
            epoch = int(self.epoch_var.numpy())
            stop = bool(max_steps) and step >= max_steps
            while epoch < cfg.epochs and not stop:
                skip = int(self.batch_var.numpy())
                dataset = self.train_data.dataset(
                    self.global_batch_size,
                    training=self.config.data.shuffle,
                    seed=cfg.seed,
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
                dist = self.strategy.experimental_distribute_dataset(dataset.with_options(options))
                bar = self._progress_bar(epoch, skip)
                batch_index = skip
                for batch in _checked_batches(dist):
                    head_only = step < cfg.freeze_encoder_steps
                    if head_only not in steps:
                        steps[head_only] = step_makers[head_only](dist.element_spec)
                    out_of_time = max_minutes is not None and wall_seconds() > max_minutes * 60
                    t0, cpu0 = time.monotonic(), time.process_time()
                    totals = steps[head_only](
                        batch, tf.constant(step, tf.int64), tf.constant(float(out_of_time))
                    )
                    loss, count, frames, stop_votes, grad_norm = (float(v) for v in totals.numpy())
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        what = "loss" if not math.isfinite(loss) else "gradient norm"
                        value = loss if what == "loss" else grad_norm
                        raise TrainingDivergedError(
                            f"Training {what} became {value} at step {step + 1} (epoch {epoch + 1}); "
                            "stopped without saving that step. The last checkpoint "
                            f"({self.manager.latest_checkpoint or 'none'}) is intact: lower "
                            "optimizer.learning_rate, add schedule warmup, or use float32."
                        )
                    step += 1
                    batch_index += 1
                    timed_steps += 1
                    # The first call of a step function traces it; throughput excludes it.
                    if timed_steps > 1:
                        step_times.append(
                            (time.monotonic() - t0, count, frames, time.process_time() - cpu0)
                        )
                        train_seconds += step_times[-1][0]
                        utterances += count
                        audio_frames += frames
                    self.batch_var.assign(batch_index)
                    window_losses.append(loss)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{np.mean(window_losses[-20:]):.2f}",
                            wer=f"{best['wer']:.1%}" if best else "-",
                            utt_s=f"{utterances / max(train_seconds, 1e-9):.1f}",
                        )
                    if step % cfg.log_every_steps == 0:
                        lr = float(self.schedule(step - 1))
                        entry = {
                            "step": step,
                            "epoch": epoch,
                            "loss": float(np.mean(window_losses)),
                            "lr": lr,
                        }
                        history["train"].append(entry)
                        with writer.as_default(step=step):
                            tf.summary.scalar("train/loss", entry["loss"])
                            tf.summary.scalar("train/learning_rate", lr)
                            tf.summary.scalar(
                                "train/utterances_per_second", utterances / max(train_seconds, 1e-9)
                            )
                        window_losses = []
                    if cfg.validate_every_steps and step % cfg.validate_every_steps == 0:
                        validate(epoch)
                    if step % cfg.checkpoint_every_steps == 0:
                        checkpoint(f"every {cfg.checkpoint_every_steps} steps")
                    if stop_votes > 0:
                        stopped_reason, stop = "max_minutes", True
                    elif max_steps and step >= max_steps:
                        stopped_reason, stop = "max_steps", True
                    if stop:
                        break
                if bar is not None:
                    bar.close()
                    bar = None
                if not stop:
                    epoch += 1
                    self.epoch_var.assign(epoch)
                    self.batch_var.assign(0)
                if last_val_step != step:
                    validate(epoch - (0 if stop else 1))
                checkpoint("end of epoch" if not stop else stopped_reason)
                if not stop and self._early_stop(history, best):
                    stopped_reason, stop = "early_stopping", True
                    self._say(
                        f"Early stopping: no WER improvement in {cfg.early_stopping_patience} "
                        "validations."
                    )
        finally:
            if bar is not None:
                bar.close()
            writer.flush()

        if last_val_step != step and step > start_step:
            validate(int(self.epoch_var.numpy()))
        elapsed = time.monotonic() - started
        if best is None:
            self._sync_eval_model()  # every worker takes part (collective reads)
        model_dir = self._export(best) if self.is_chief else None
        final = history["val"][-1] if history["val"] else None
        report = self._report(
            history,
            best,
            final,
            step,
            start_step,
            stopped_reason,
            elapsed,
            train_seconds,
            utterances,
            audio_frames,
            step_times,
        )
        if self.is_chief:
            files.write_json(self.out_dir / HISTORY_FILE, history)
            files.write_json(self.out_dir / REPORT_FILE, report)
            try:
                plot_curves(history, self.out_dir / CURVES_FILE)
            except Exception as e:  # a missing plot must not cost the trained model
                self._say(f"Could not draw {CURVES_FILE}: {e}")
        return TrainingResult(
            out_dir=self.out_dir,
            model_dir=model_dir,
            steps=step,
            stopped_reason=stopped_reason,
            best=best,
            final=final,
            report=report,
        )

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
        return self._agree(stale >= cfg.early_stopping_patience)

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
        path = save_model_dir(
            self.out_dir / MODEL_DIR, self._bundle(model, metadata), serving=self.export_serving
        )
        self._say(f"Model written to {path}" + (f" (best WER {best['wer']:.2%})" if best else ""))
        return path

    def _report(
        self,
        history,
        best,
        final,
        step,
        start_step,
        reason,
        elapsed,
        train_seconds,
        utts,
        frames,
        step_times,
    ):
        stride = self.featurizer.window_stride
        per_step = np.array(step_times, dtype=np.float64).reshape(-1, 4)
        return {
            "config": self.config.to_dict(),
            "architecture": {
                "params": int(sum(np.prod(w.shape) for w in self.model.trainable_weights)),
                "blocks": len(self.architecture.get("stackwise_filters", [])),
            },
            "labels": list(self.tokenizer.labels),
            "featurizer": self.featurizer.to_dict(),
            "data": {
                "train": {
                    "source": self.train_data.description,
                    "utterances": self.train_data.num_utterances,
                    "hours": self.train_data.hours,
                },
                "val": None
                if self.val_data is None
                else {
                    "source": self.val_data.description,
                    "utterances": self.val_data.num_utterances,
                    "hours": self.val_data.hours,
                },
            },
            "strategy": {
                "name": strategy_name(self.strategy),
                "replicas": self.strategy.num_replicas_in_sync,
                "global_batch_size": self.global_batch_size,
            },
            "steps": step,
            "resumed_from_step": start_step if self._resuming else None,
            "steps_this_run": step - start_step,
            "epochs_completed": int(self.epoch_var.numpy()),
            "steps_per_epoch_estimate": self.steps_per_epoch,
            "stopped_reason": reason,
            "wall_time_s": elapsed,
            "train_step_time_s": train_seconds,
            "throughput": {
                "utterances_per_s": utts / train_seconds if train_seconds else None,
                "audio_seconds_per_s": frames * stride / train_seconds if train_seconds else None,
                # Per-step medians (the first step of a run traces the graph and is left out).
                "timed_steps": len(per_step),
                "median_step_s": float(np.median(per_step[:, 0])) if len(per_step) else None,
                "median_utterances_per_s": float(np.median(per_step[:, 1] / per_step[:, 0]))
                if len(per_step)
                else None,
                "median_audio_seconds_per_s": float(
                    np.median(per_step[:, 2] * stride / per_step[:, 0])
                )
                if len(per_step)
                else None,
                # CPU seconds of this process per step (all its threads): on a shared machine
                # steadier than wall time.
                "median_step_cpu_s": float(np.median(per_step[:, 3])) if len(per_step) else None,
            },
            "final": final,
            "best": best,
        }


def plot_curves(history: dict, path) -> None:
    """Training loss (and validation loss) and validation WER/CER against steps, as a PNG."""
    # The object API with the Agg canvas: no pyplot, no GUI backend, no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_wer = fig.subplots(1, 2)
    train, val = history.get("train", []), history.get("val", [])
    if train:
        ax_loss.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss")
    if val:
        steps = [h["step"] for h in val]
        ax_loss.plot(steps, [h["loss"] for h in val], "o-", label="val loss")
        ax_wer.plot(steps, [100 * h["wer"] for h in val], "o-", label="val WER")
        ax_wer.plot(steps, [100 * h["cer"] for h in val], "s--", label="val CER")
        for h in val:
            ax_wer.annotate(f"e{h['epoch'] + 1}", (h["step"], 100 * h["wer"]), fontsize=7)
    ax_loss.set(xlabel="step", ylabel="CTC loss (mean over batch of sums)", title="Loss")
    ax_wer.set(xlabel="step", ylabel="%", title="Validation error rates")
    for ax in (ax_loss, ax_wer):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)


def train(config: TrainConfig, out_dir, train_data, val_data=None, **kwargs) -> TrainingResult:
    """Shortcut: ``Trainer(config, out_dir, train_data, val_data, **init_kwargs).fit(...)``;
    ``max_steps`` and ``max_minutes`` go to :meth:`Trainer.fit`, the rest to the Trainer."""
    fit_kwargs = {k: kwargs.pop(k) for k in ("max_steps", "max_minutes") if k in kwargs}
    return Trainer(config, out_dir, train_data, val_data, **kwargs).fit(**fit_kwargs)
