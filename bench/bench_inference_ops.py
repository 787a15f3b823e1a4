"""Single-op timings behind the inference rewrite (qn_keras.inference_graph), microseconds.

1. TensorFlow (oneDNN): a depthwise time convolution on ``[1, T, 1, C]`` with a ``(K, 1)``
   kernel (the Keras model's layout) against the same on ``[1, 1, T, C]`` with ``(1, K)``.
2. TFLite / LiteRT with XNNPACK, 1 thread: depthwise ``(1, K)`` for K from 3 to 63 (where
   XNNPACK's one-pass kernels stop), and float32 against full-integer int8 for a 1x1
   pointwise convolution and a 25-tap depthwise one, on TensorFlow 2.15's TFLite and on the
   LiteRT runtime (ai-edge-litert, when installed).

T = 1,000 frames (20 s after the stride-2 first block), C = 256. Medians of 30 calls after
warm-up. The machine must be idle; the CPU model is printed with the results.

    .venv/bin/python bench/bench_inference_ops.py [--out bench/results/inference_ops.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
T, C = 1000, 256


def median_us(fn, calls: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def tf_layouts() -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for channels, kernel in ((256, 33), (512, 63)):
        x = rng.normal(size=(1, T + kernel - 1, 1, channels)).astype(np.float32)
        w = rng.normal(size=(kernel, 1, channels, 1)).astype(np.float32)
        height = tf.function(lambda x, w=w: tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "VALID"))
        w_t = np.swapaxes(w, 0, 1)
        width = tf.function(lambda x, w=w_t: tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "VALID"))
        xh, xw = tf.constant(x), tf.constant(np.swapaxes(x, 1, 2))
        assert np.array_equal(height(xh).numpy().ravel(), width(xw).numpy().ravel())
        out[f"C{channels}_K{kernel}"] = {
            "height_us": median_us(lambda f=height, x=xh: f(x).numpy()),
            "width_us": median_us(lambda f=width, x=xw: f(x).numpy()),
        }
    return out


def tflite_model(kind: str, taps: int = 25, int8: bool = False) -> bytes:
    x = tf.keras.Input((1, T, C), batch_size=1)
    if kind == "pointwise":
        y = tf.keras.layers.Conv2D(C, 1)(x)
    else:
        y = tf.keras.layers.DepthwiseConv2D((1, taps), padding="same", use_bias=False)(x)
    converter = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(x, y))
    if int8:
        rng = np.random.default_rng(1)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [rng.normal(size=(1, 1, T, C)).astype(np.float32)] for _ in range(4)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def invoke_us(blob: bytes, engine: str, threads: int = 1) -> float:
    from qn_keras import tflite as lite

    model = lite.TFLiteModel(blob, threads, engine)
    x = np.random.default_rng(2).normal(size=(1, 1, T, C)).astype(np.float32)
    return median_us(lambda: model(x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "inference_ops.json"
    )
    args = parser.parse_args(argv)
    from bench_inference import machine

    from qn_keras.tflite import litert_available

    engines = ["xnnpack"] + (["litert"] if litert_available() else [])
    report = {"machine": machine(), "tf_depthwise_layouts": tf_layouts()}
    print(json.dumps(report["tf_depthwise_layouts"]), flush=True)
    report["xnnpack_depthwise_taps"] = {
        str(k): {e: invoke_us(tflite_model("depthwise", k), e) for e in engines}
        for k in (3, 9, 17, 25, 33, 63)
    }
    print(json.dumps(report["xnnpack_depthwise_taps"]), flush=True)
    report["int8_vs_float32"] = {
        kind: {
            precision: {
                e: invoke_us(tflite_model(kind, int8=precision == "int8"), e) for e in engines
            }
            for precision in ("float32", "int8")
        }
        for kind in ("pointwise", "depthwise")
    }
    print(json.dumps(report["int8_vs_float32"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
