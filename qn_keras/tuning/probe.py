"""Size and CPU speed of a candidate model, measured before it is trained.

Speed is seconds of audio per second of wall-clock time for the acoustic model alone (the
featurizer is the same for every candidate and is left out): one forward pass over
``seconds`` of audio (as 10 ms feature frames, batch 1) on the CPU, traced once and then timed
``repeats`` times; the fastest run counts, as ``timeit`` advises, because on a shared machine
the slower runs measure the other users, not the model.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow as tf

from qn_keras.summary import FEATURE_FRAMES_PER_SECOND, model_summary


@dataclasses.dataclass
class Probe:
    params: int
    macs_per_second: int
    speed: float  # seconds of audio per second, CPU, batch 1

    @property
    def latency_ms(self) -> float:
        """Milliseconds of CPU time per second of audio."""
        return 1000.0 / self.speed

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "macs_per_second": self.macs_per_second,
            "speed": self.speed,
            "latency_ms": self.latency_ms,
        }


def measure_speed(model, seconds: float = 10.0, repeats: int = 3, seed: int = 0) -> float:
    """Seconds of audio per second for a CPU forward pass of ``model`` (batch 1)."""
    frames = max(1, int(round(seconds * FEATURE_FRAMES_PER_SECOND)))
    num_features = model.get_config()["num_features"]
    rng = np.random.default_rng(seed)
    with tf.device("/CPU:0"):
        features = tf.constant(rng.standard_normal((1, frames, num_features), dtype=np.float32))
        lengths = tf.constant([frames], tf.int32)

        @tf.function
        def forward(x, n):
            return model([x, n], training=False)

        forward(features, lengths)[0].numpy()  # trace and warm up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            forward(features, lengths)[0].numpy()
            best = min(best, time.perf_counter() - start)
    return frames / FEATURE_FRAMES_PER_SECOND / best


def probe_model(model, seconds: float = 10.0, repeats: int = 3, *, time_it: bool = True) -> Probe:
    """Parameters, MACs per second of audio and (with ``time_it``) CPU speed of ``model``."""
    summary = model_summary(model)
    speed = measure_speed(model, seconds, repeats) if time_it else float("nan")
    return Probe(summary["params"], summary["macs_per_second"], speed)
