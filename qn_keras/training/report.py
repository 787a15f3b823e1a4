"""A training run's report (``training_report.json``) and its curves (``curves.png``)."""

from __future__ import annotations

import numpy as np

from qn_keras import files
from qn_keras.training.distribution import strategy_name


def build_report(trainer, state, final: dict | None, elapsed: float) -> dict:
    """``training_report.json``: config, model size, data, strategy, steps, time, throughput,
    final and best validation, from a trainer and its finished loop state."""
    data = {
        "train": {
            "source": trainer.train_data.description,
            "utterances": trainer.train_data.num_utterances,
            "hours": trainer.train_data.hours,
        },
        "val": None,
    }
    if trainer.val_data is not None:
        data["val"] = {
            "source": trainer.val_data.description,
            "utterances": trainer.val_data.num_utterances,
            "hours": trainer.val_data.hours,
        }
    return {
        "config": trainer.config.to_dict(),
        "architecture": {
            "params": int(sum(np.prod(w.shape) for w in trainer.model.trainable_weights)),
            "blocks": len(trainer.architecture.get("stackwise_filters", [])),
        },
        "labels": list(trainer.tokenizer.labels),
        "featurizer": trainer.featurizer.to_dict(),
        "data": data,
        "strategy": {
            "name": strategy_name(trainer.strategy),
            "replicas": trainer.strategy.num_replicas_in_sync,
            "global_batch_size": trainer.global_batch_size,
        },
        "steps": state.step,
        "resumed_from_step": state.start_step if trainer._resuming else None,
        "steps_this_run": state.step - state.start_step,
        "epochs_completed": int(trainer.epoch_var.numpy()),
        "steps_per_epoch_estimate": trainer.steps_per_epoch,
        "stopped_reason": state.stopped_reason,
        "wall_time_s": elapsed,
        "train_step_time_s": state.train_seconds,
        "throughput": state.throughput(trainer.featurizer.window_stride),
        "final": final,
        "best": state.best,
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
