"""TFLite conversion of float, pruned and quantized QuartzNet models, and a small runner.

The TFLite models here take log-mel ``features`` float32 ``[1, frames, num_features]`` (one
utterance, every frame valid) and return ``logits`` float32 ``[1, frames', vocabulary]``
(:class:`TFLiteRunner` applies the log-softmax in float).
The featurizer stays outside: its log and normalization do not quantize to int8, and the
serving package's waveform-in TFLite covers the float front end.

With one utterance and no padding, the encoder's ``SequenceMask`` layers multiply by ones, so
the export graph drops them. That matters for integer models: a float mask multiply between two
quantized convolutions forces a dequantize / float op / quantize round trip at every mask, and
the TFLite converter then leaves the convolutions themselves in float.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras import files
from qn_keras import tflite as lite
from qn_keras.errors import UserInputError
from qn_keras.inference_graph import tflite_encoder, unsupported_reason
from qn_keras.optimization.export_graph import export_graph

MODES = lite.MODES


def serving_function(model: tf.keras.Model, num_features: int, batch_size: int | None = 1):
    """A concrete function ``features -> logits``, and the trackable holding its variables.

    Float and pruned QuartzNet models convert through the inference rewrite
    (:func:`qn_keras.inference_graph.tflite_encoder`: BN folded, XNNPACK-sized depthwise
    kernels, static shapes); fake-quantized ones through ``export_graph(model)``."""
    spec = tf.TensorSpec([batch_size, None, num_features], tf.float32, name="features")
    if unsupported_reason(model) is None:
        encoder = tflite_encoder(model)

        @tf.function(input_signature=[spec])
        def rewritten(features):
            shape = tf.shape(features)
            return {"logits": encoder.logits(features, tf.fill(shape[:1], shape[1]))[0]}

        return rewritten.get_concrete_function(), encoder
    graph = export_graph(model)

    @tf.function(input_signature=[spec])
    def logprobs(features):
        shape = tf.shape(features)
        lengths = tf.fill(shape[:1], shape[1])
        return {"logits": graph([features, lengths], training=False)}

    return logprobs.get_concrete_function(), graph


def convert(
    model: tf.keras.Model,
    mode: str,
    *,
    num_features: int = 64,
    representative_features=None,
    num_threads: int | None = None,
) -> bytes:
    """Converts ``model`` to a TFLite flatbuffer.

    Args:
        model: a float QuartzNetCTC (or stripped pruned model) for ``float32``, ``float16``,
            ``dynamic`` and ``int8``; a fake-quantized model from ``quantize_model`` for ``qat``.
        mode: ``float32``; ``float16`` (float16 weights, float compute); ``dynamic`` (int8
            weights, float activations); ``int8`` (post-training full-integer: int8 weights and
            activations, calibrated on ``representative_features``, float input and output);
            ``qat`` (integer model from the fake-quantization ranges learned in training).
        representative_features: for ``int8``: an iterable of float32 ``[frames, num_features]``
            feature arrays from the training data.
    """
    if mode not in MODES:
        raise UserInputError(f"Unknown TFLite mode {mode!r}. Known: {', '.join(MODES)}.")
    if mode == "int8" and representative_features is None:
        raise UserInputError("int8 post-training quantization needs representative_features.")
    fn, graph = serving_function(model, num_features)
    return lite.convert_function(fn, graph, mode, representative_features)


def write_tflite(path, blob: bytes) -> Path:
    """Writes ``blob`` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return files.write_bytes(path, blob)


class TFLiteRunner:
    """Runs a features-in TFLite model one utterance at a time (dynamic number of frames)."""

    def __init__(self, model_path_or_bytes, num_threads: int | None = None, engine="xnnpack"):
        self.model = lite.TFLiteModel(model_path_or_bytes, num_threads, engine)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """``[frames, num_features]`` float32 -> ``[frames', vocabulary]`` log-probabilities.

        The model returns logits; log-softmax runs here in float64 -> float32, so integer
        models do not round their log-probabilities to 8 bits.
        """
        return lite.log_softmax(self.model(np.asarray(features, np.float32)[None])[0])


def op_counts(model_path_or_bytes) -> Counter:
    """TFLite builtin op names and how often each occurs."""
    interpreter = lite.interpreter(model_path_or_bytes)
    return Counter(op["op_name"] for op in interpreter._get_ops_details())


def compute_op_types(model_path_or_bytes) -> dict:
    """For each weighted op (conv, depthwise, fully connected): ``{name: input dtype}``.

    An integer model has int8 activations into every one of them.
    """
    interpreter = lite.interpreter(model_path_or_bytes)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    out = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            data, weight = tensors[op["inputs"][0]], tensors[op["inputs"][1]]
            out[weight["name"]] = {
                "op": op["op_name"],
                "input_dtype": np.dtype(data["dtype"]).name,
                "weight_dtype": np.dtype(weight["dtype"]).name,
            }
    return out


def weight_tensors(model_path_or_bytes) -> list[dict]:
    """The weight tensors of conv / depthwise / fully-connected ops with their quantization."""
    interpreter = lite.interpreter(model_path_or_bytes)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    out = []
    for op in interpreter._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        detail = tensors[op["inputs"][1]]
        try:
            value = interpreter.get_tensor(detail["index"])
        except ValueError:
            continue
        q = detail["quantization_parameters"]
        out.append(
            {
                "name": detail["name"],
                "op": op["op_name"],
                "dtype": np.dtype(detail["dtype"]).name,
                "value": value,
                "scales": q["scales"],
                "axis": q["quantized_dimension"],
            }
        )
    return out


def speed(
    model_path_or_bytes,
    *,
    frames: int = 500,
    num_features: int = 64,
    threads: int = 1,
    engine: str = "xnnpack",
    repeat: int = 5,
    invokes: int = 10,
    frames_per_second: float = 100.0,
) -> dict:
    """Seconds of audio per second for a fixed ``frames``-long input (5 s by default).

    A fixed shape, because every new input length makes the interpreter re-plan (and, with the
    XNNPACK delegate, re-pack the weights), which would swamp the kernels being compared.
    ``engine``: one of :data:`qn_keras.tflite.ENGINES`. Returns the best of ``repeat`` runs of
    ``invokes`` calls, per wall-clock second and per CPU second of this process (on a shared
    machine the CPU-time figure is the stable one; with one thread they agree on an idle one).
    """
    interpreter = lite.interpreter(model_path_or_bytes, num_threads=threads, engine=engine)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], [1, frames, num_features])
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    interpreter.set_tensor(
        detail["index"], rng.normal(size=(1, frames, num_features)).astype(np.float32)
    )
    interpreter.invoke()
    audio = invokes * frames / frames_per_second
    wall = cpu = 0.0
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(invokes):
            interpreter.invoke()
        wall = max(wall, audio / max(time.perf_counter() - w0, 1e-9))
        cpu = max(cpu, audio / max(time.process_time() - c0, 1e-9))
    return {"wall": wall, "cpu": cpu}


def tensor_elements(model_path_or_bytes, dtype: str, constant: bool = False) -> int:
    """Elements in the model's tensors of ``dtype`` (``constant``: only those holding data)."""
    interpreter = lite.interpreter(model_path_or_bytes)
    total = 0
    for detail in interpreter.get_tensor_details():
        if np.dtype(detail["dtype"]).name != dtype:
            continue
        if constant:
            try:
                interpreter.get_tensor(detail["index"])
            except ValueError:
                continue
        total += int(np.prod(detail["shape"]))
    return total


def audio_seconds_per_second(
    runner: TFLiteRunner,
    features: list[np.ndarray],
    frames_per_second: float = 100.0,
    repeat: int = 1,
) -> float:
    """Seconds of audio (from feature frames) processed per wall-clock second, after warm-up;
    the best of ``repeat`` passes (on a shared machine the least disturbed one)."""
    if not features:
        raise UserInputError("audio_seconds_per_second needs at least one utterance.")
    runner(features[0])
    audio = sum(len(f) for f in features) / frames_per_second
    best = 0.0
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        for f in features:
            runner(f)
        best = max(best, audio / max(time.perf_counter() - start, 1e-9))
    return best
