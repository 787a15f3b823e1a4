"""XNNPACK or TFLite's built-in kernels for a whole QuartzNet: which runs `qn export`'s .tflite
faster on this CPU?

`bench/bench_int8_kernels.py` found XNNPACK's depthwise convolution 3x slower than the built-in
kernel at QuartzNet's long kernels (33-87 taps). This measures the end-to-end effect on the
exported waveform-to-log-probabilities graph (featurizer inside) of a preset with random
weights (speed does not depend on them): float32 and dynamic-range .tflite, each with the
default XNNPACK delegate and without it, 1 and 2 threads, on a 5 s and a 20 s input. Prints
seconds of audio per CPU second of this process (median of rounds; the machine is shared, so
CPU time is the steadier figure) and per wall second.

    .venv/bin/python bench/bench_tflite_engines.py [--preset quartznet_5x5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def export_tflite(preset: str, workdir: Path) -> dict[str, Path]:
    import tensorflow as tf

    from qn_keras.featurizer import FeaturizerConfig
    from qn_keras.model_dir import ModelBundle
    from qn_keras.presets import build_model
    from qn_keras.tokenizer import CharTokenizer
    from serving.tflite import convert_tflite

    tf.keras.utils.set_random_seed(0)
    bundle = ModelBundle(build_model(preset), CharTokenizer(), FeaturizerConfig())
    return convert_tflite(bundle, workdir, modes=("float32", "dynamic"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quartznet_5x5")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from serving.tflite import TFLiteRecognizer

    rng = np.random.default_rng(0)
    clips = {s: (rng.normal(size=s * 16000) * 0.05).astype(np.float32) for s in (5, 20)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_tflite(args.preset, Path(tmp))
        print(f"{args.preset}: seconds of audio per second, median of {args.rounds} rounds")
        print(f"{'tflite':<9}{'engine':<10}{'threads':>8}{'clip':>6}{'per CPU s':>11}{'per s':>8}")
        for mode, path in paths.items():
            for threads in (1, 2):
                runners = {
                    engine: TFLiteRecognizer(path, num_threads=threads, engine=engine)
                    for engine in ("xnnpack", "builtin")
                }
                for seconds, clip in clips.items():
                    for engine, runner in runners.items():
                        runner.logprobs(clip)  # plans for this length (XNNPACK packs weights)
                        cpu, wall = [], []
                        for _ in range(args.rounds):
                            w0, c0 = time.perf_counter(), time.process_time()
                            runner.logprobs(clip)
                            cpu.append(seconds / (time.process_time() - c0))
                            wall.append(seconds / (time.perf_counter() - w0))
                        print(
                            f"{mode:<9}{engine:<10}{threads:>8}{seconds:>5}s"
                            f"{statistics.median(cpu):>11.1f}{statistics.median(wall):>8.1f}"
                        )


if __name__ == "__main__":
    main()
