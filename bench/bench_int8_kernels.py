"""Why int8 TFLite is not faster than float32 for QuartzNet on this CPU: single-op timings.

One TFLite op at a time, on QuartzNet's shapes (``[1, T, 1, C]`` time-channel layout, 5 s of
audio at 50 frames/s after the stride-2 first block): a depthwise conv with a short kernel
(3, what CPU libraries are tuned for) and with QuartzNet's long ones (33 to 87), and a 1x1
pointwise conv. float32 and full-integer int8 (post-training, per-channel weights), with the
default XNNPACK delegate and with TFLite's built-in kernels, 1 thread. Prints the median over
rounds of microseconds per call measured in process CPU time (the machine is shared).

    .venv/bin/python bench/bench_int8_kernels.py [--channels 256] [--frames 250] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def single_op_model(kind: str, kernel: int, frames: int, channels: int) -> tf.keras.Model:
    x = tf.keras.Input((frames, 1, channels), batch_size=1)
    if kind == "depthwise":
        y = tf.keras.layers.DepthwiseConv2D((kernel, 1), padding="same")(x)
    else:
        y = tf.keras.layers.Conv2D(channels, 1)(x)
    return tf.keras.Model(x, y)


def convert(model: tf.keras.Model, int8: bool, rng) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        shape = [1, *model.input_shape[1:]]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [rng.normal(size=shape).astype(np.float32)] for _ in range(8)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def interpreter(blob: bytes, xnnpack: bool, x: np.ndarray) -> tf.lite.Interpreter:
    kwargs = {}
    if not xnnpack:
        kwargs["experimental_op_resolver_type"] = (
            tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    it = tf.lite.Interpreter(model_content=blob, num_threads=1, **kwargs)
    it.allocate_tensors()
    detail = it.get_input_details()[0]
    if detail["dtype"] != np.float32:
        scale, zero = detail["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(detail["dtype"])
    it.set_tensor(detail["index"], x)
    it.invoke()
    return it


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, args.frames, 1, args.channels)).astype(np.float32)
    cases = [("depthwise", 3), ("depthwise", 33), ("depthwise", 63), ("pointwise", 1)]
    interpreters = {}
    for kind, kernel in cases:
        model = single_op_model(kind, kernel, args.frames, args.channels)
        for int8 in (False, True):
            blob = convert(model, int8, rng)
            for xnnpack in (True, False):
                key = (kind, kernel, "int8" if int8 else "float32", xnnpack)
                interpreters[key] = interpreter(blob, xnnpack, x)
    times = {key: [] for key in interpreters}
    for _ in range(args.rounds):
        for key, it in interpreters.items():
            start = time.process_time()
            for _ in range(args.calls):
                it.invoke()
            times[key].append((time.process_time() - start) / args.calls * 1e6)
    print(f"T={args.frames} frames, C={args.channels} channels, 1 thread, us per call (median)")
    print(f"{'op':<16}{'dtype':<9}{'XNNPACK':>10}{'built-in':>10}")
    for kind, kernel in cases:
        for dtype in ("float32", "int8"):
            cells = [statistics.median(times[(kind, kernel, dtype, x)]) for x in (True, False)]
            name = f"{kind} k={kernel}" if kind == "depthwise" else kind
            print(f"{name:<16}{dtype:<9}{cells[0]:>10.0f}{cells[1]:>10.0f}")


if __name__ == "__main__":
    main()
