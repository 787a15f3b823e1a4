"""Where a training loop is: its step, history, best validation and the timing of its steps.
One object the :class:`~qn_keras.training.trainer.Trainer`'s loop updates and its report reads,
instead of variables shared between nested functions."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class LoopState:
    step: int
    start_step: int
    history: dict  # {"train": [logged losses], "val": [validations]}
    best: dict | None  # the validation with the lowest WER so far
    last_val_step: int | None = None
    last_checkpoint_step: int | None = None
    stopped_reason: str = "epochs"
    # Timing: the first step of a run traces the graph and is left out of throughput.
    steps_run: int = 0
    train_seconds: float = 0.0
    utterances: float = 0.0
    audio_frames: float = 0.0
    step_times: list = dataclasses.field(default_factory=list)  # (s, utts, frames, CPU s)
    window_losses: list = dataclasses.field(default_factory=list)

    def record_step(self, loss, seconds, utterances, frames, cpu_seconds) -> None:
        self.step += 1
        self.steps_run += 1
        if self.steps_run > 1:
            self.step_times.append((seconds, utterances, frames, cpu_seconds))
            self.train_seconds += seconds
            self.utterances += utterances
            self.audio_frames += frames
        self.window_losses.append(loss)

    def utterances_per_second(self) -> float:
        return self.utterances / max(self.train_seconds, 1e-9)

    def log_window(self, epoch: int, lr: float) -> dict:
        """The mean loss since the last log, as a history entry; starts a new window."""
        entry = {
            "step": self.step,
            "epoch": epoch,
            "loss": float(np.mean(self.window_losses)),
            "lr": lr,
        }
        self.history["train"].append(entry)
        self.window_losses = []
        return entry

    def add_validation(self, epoch: int, metrics: dict) -> tuple[dict, bool]:
        """Records a validation; returns (its history entry, whether it is the new best)."""
        entry = {"step": self.step, "epoch": epoch, **metrics}
        self.history["val"].append(entry)
        self.last_val_step = self.step
        improved = self.best is None or metrics["wer"] < self.best["wer"]
        if improved:
            self.best = dict(entry)
        return entry, improved

    def throughput(self, frame_seconds: float) -> dict:
        """The report's throughput section; ``frame_seconds`` is one feature frame's hop."""
        per_step = np.array(self.step_times, dtype=np.float64).reshape(-1, 4)
        seconds = self.train_seconds

        def median(values):
            return float(np.median(values)) if len(per_step) else None

        return {
            "utterances_per_s": self.utterances / seconds if seconds else None,
            "audio_seconds_per_s": self.audio_frames * frame_seconds / seconds if seconds else None,
            # Per-step medians (the first step of a run traces the graph and is left out).
            "timed_steps": len(per_step),
            "median_step_s": median(per_step[:, 0]),
            "median_utterances_per_s": median(per_step[:, 1] / per_step[:, 0]),
            "median_audio_seconds_per_s": median(per_step[:, 2] * frame_seconds / per_step[:, 0]),
            # CPU seconds of this process per step (all its threads): on a shared machine
            # steadier than wall time.
            "median_step_cpu_s": median(per_step[:, 3]),
        }


def validations_without_improvement(wers, min_delta: float = 0.0) -> int:
    """Validations since the last one that beat every earlier WER by more than ``min_delta``."""
    since, best = 0, math.inf
    for wer in wers:
        if wer < best - min_delta:
            best, since = wer, 0
        else:
            since += 1
    return since
