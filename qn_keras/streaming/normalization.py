"""How streaming normalizes features it cannot see the end of.

The featurizer normalizes each mel band by the utterance's own mean and standard deviation
(NeMo's ``per_feature``), which needs the whole utterance. A stream has three other rules
(:data:`RULES`); ``bench/bench_streaming.py`` measures what each costs in WER:

- ``running``: the statistics of every frame heard so far, right context included, updated a
  chunk at a time. Needs nothing from training; tends to the offline rule as the stream goes
  on, and equals it for utterances heard whole before their first chunk is due. Buffered mode
  only: it depends on how the stream was chunked.
- ``pooled``: ``running`` pooled with the model's prior, counted as ``prior_frames`` frames:
  steadier early in long utterances, further from the offline rule at their end.
- ``fixed``: a :class:`FeaturePrior` estimated from training audio (the average utterance's
  per-band mean and variance), never updated.
- ``adaptive``: the prior blended with the frames heard up to and including each frame, the
  prior counting as ``prior_frames`` frames: frame ``t`` uses
  ``mean_t = (N0*mu0 + sum_{s<=t} x_s) / (N0 + t + 1)`` and the matching second moment. It
  starts at the prior and follows the speaker's level as the stream goes on. Frame-causal, so
  the result does not depend on chunking (stateful mode can equal offline inference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from qn_keras.errors import UserInputError
from qn_keras.featurizer import NORM_EPSILON, FeatureStatistics, causal_normalize

RULES = ("running", "pooled", "adaptive", "fixed")
# Metadata key of a model folder's prior (qn_model.json "metadata").
METADATA_KEY = "feature_prior"
DEFAULT_PRIOR_FRAMES = 100.0  # 1 s of audio: measured best of 30/50/100/300 (BENCHMARKS.md)


@dataclasses.dataclass(frozen=True)
class FeaturePrior:
    """Per-band mean and standard deviation of un-normalized log-mel frames, as the average
    training utterance has them (means of the per-utterance means and variances)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    utterances: int = 0

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise UserInputError("A feature prior needs one mean and one std per mel band.")
        if not all(np.isfinite(self.mean)) or not all(s > 0 for s in self.std):
            raise UserInputError("A feature prior needs finite means and positive stds.")

    @property
    def num_mels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict:
        return {
            "mean": [round(float(v), 6) for v in self.mean],
            "std": [round(float(v), 6) for v in self.std],
            "utterances": int(self.utterances),
        }

    @classmethod
    def from_dict(cls, data: dict) -> FeaturePrior:
        try:
            return cls(
                tuple(float(v) for v in data["mean"]),
                tuple(float(v) for v in data["std"]),
                int(data.get("utterances", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserInputError(f"Bad feature prior {str(data)[:80]}: {e}") from None


def estimate_prior(log_mels: Iterable[np.ndarray]) -> FeaturePrior:
    """The prior of un-normalized log-mel utterances ``[frames, num_mels]``: per band, the mean
    of the utterances' means and the square root of the mean of their (unbiased) variances."""
    means, variances = [], []
    for frames in log_mels:
        frames = np.asarray(frames, dtype=np.float64)
        if len(frames) < 2:
            continue
        means.append(frames.mean(axis=0))
        variances.append(frames.var(axis=0, ddof=1))
    if not means:
        raise UserInputError("No utterance of two frames or more to estimate a feature prior.")
    return FeaturePrior(
        tuple(np.mean(means, axis=0)), tuple(np.sqrt(np.mean(variances, axis=0))), len(means)
    )


def resolve(featurizer, rule: str | None, prior: FeaturePrior | None, prior_frames: float):
    """``(rule, prior, prior_frames)`` a stream of this model normalizes with. A model
    trained for streaming (a front end with ``normalize: adaptive/fixed``) brings its own rule
    and prior, and another rule is refused; for the others ``rule`` (None: ``running``) and the
    folder's ``prior`` apply."""
    if featurizer.causal:
        if rule not in (None, featurizer.normalize):
            raise UserInputError(
                f"This model was trained with {featurizer.normalize!r} normalization; its "
                f"streams normalize that way (asked for {rule!r})."
            )
        own = FeaturePrior(featurizer.prior_mean, featurizer.prior_std)
        return featurizer.normalize, own, featurizer.prior_frames
    return rule or "running", prior, prior_frames


def prior_from_metadata(metadata: dict) -> FeaturePrior | None:
    data = (metadata or {}).get(METADATA_KEY)
    return FeaturePrior.from_dict(data) if data else None


class Normalizer:
    """Normalizes the un-normalized log-mel frames of one stream, in order.

    ``add(frames)`` takes frames as they are heard and returns what to keep of them: for the
    frame-causal rules (``adaptive``, ``fixed``) the frames already normalized, with the same
    :func:`~qn_keras.featurizer.causal_normalize` the stream step runs (a frame's value never
    changes, so it is computed once); for ``running`` and ``pooled`` the frames as they are.
    ``normalize(kept)`` gives kept frames their normalization with what has been heard so far.
    """

    def __init__(
        self,
        rule: str,
        num_mels: int,
        prior: FeaturePrior | None = None,
        prior_frames: float = DEFAULT_PRIOR_FRAMES,
    ):
        if rule not in RULES:
            raise UserInputError(f"Unknown normalization {rule!r}; choose from {RULES}.")
        if rule != "running" and prior is None:
            raise UserInputError(
                f"Streaming normalization {rule!r} needs the model's feature prior (the "
                "average training utterance's statistics), which this model folder lacks: add "
                "it with `qn model prior MODEL AUDIO...`, or use --normalization running."
            )
        if prior is not None and prior.num_mels != num_mels:
            raise UserInputError(
                f"The feature prior has {prior.num_mels} bands; the model has {num_mels}."
            )
        if prior_frames <= 0:
            raise UserInputError(f"prior_frames must be > 0. Received: {prior_frames}")
        self.rule = rule
        self.prior = prior
        self.prior_frames = float(prior_frames)
        self.running = FeatureStatistics(num_mels)
        self._mu0 = np.asarray(prior.mean if prior else np.zeros(num_mels), np.float64)
        self._var0 = np.asarray(prior.std if prior else np.ones(num_mels), np.float64) ** 2
        self._sums = None  # causal_normalize's carried sums (adaptive)

    @property
    def causal(self) -> bool:
        return self.rule in ("adaptive", "fixed")

    def add(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames, np.float32)
        if not self.causal:
            self.running.add(frames)
            return frames
        import tensorflow as tf

        out, self._sums = causal_normalize(
            tf.constant(frames[None]),
            tf.ones([1, len(frames), 1]),
            tf.constant(self._mu0, tf.float32),
            tf.constant(self._var0, tf.float32),
            self.prior_frames if self.rule == "adaptive" else None,
            self._sums,
        )
        return out[0].numpy()

    def normalize(self, kept: np.ndarray) -> np.ndarray:
        if self.causal:
            return kept
        if self.rule == "running":
            return self.running.normalize(kept)
        # pooled: everything heard so far, pooled with the prior counted as prior_frames frames.
        count, n0 = self.running.count, self.prior_frames
        heard_mean = self.running.mean
        heard_var = self.running.std**2 * max(count - 1, 1) / max(count, 1)
        mean = (n0 * self._mu0 + count * heard_mean) / (n0 + count)
        second = (n0 * (self._var0 + self._mu0**2) + count * (heard_var + heard_mean**2)) / (
            n0 + count
        )
        std = np.sqrt(np.maximum(second - mean**2, 0.0))
        return ((kept - mean) / (std + NORM_EPSILON)).astype(np.float32)
