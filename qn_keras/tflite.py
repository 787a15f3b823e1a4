"""The one TFLite stack: converting a graph in one of the project's modes, and running a
``.tflite`` on one input at a time. Both the waveform-in export (:mod:`serving.tflite`) and the
features-in models of ``qn optimize`` (:mod:`qn_keras.optimization.tflite`) use it, as
tensorflow/models' ``export_tflite_lib.convert_tflite_model(saved_model_dir, quant_type)``
serves every model there.

Modes: ``float32``; ``float16`` (float16 weights, float compute); ``dynamic`` (int8 weights,
float activations); ``int8`` (post-training full-integer, calibrated on representative
inputs, float input and output); ``qat`` (integer model from the fake-quantization ranges a
quantization-aware model learned). Engines: see :data:`ENGINES`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras.errors import UserInputError

MODES = ("float32", "float16", "dynamic", "int8", "qat")
# xnnpack / builtin: TensorFlow 2.15's own TFLite runtime with or without its default XNNPACK
# delegate; litert: the standalone LiteRT runtime (PyPI ai-edge-litert, the `litert` extra),
# whose newer XNNPACK has int8 kernels for AVX512-VNNI and runs our integer models 2-3x faster
# than float32 (BENCHMARKS.md "Inference"); auto: litert when installed, else xnnpack.
ENGINES = ("auto", "litert", "xnnpack", "builtin")


def litert_available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str) -> str:
    """``engine`` with ``auto`` replaced by the runtime it picks."""
    if engine not in ENGINES:
        raise UserInputError(f"Unknown TFLite engine {engine!r}; choose from {', '.join(ENGINES)}.")
    if engine == "auto":
        return "litert" if litert_available() else "xnnpack"
    return engine


def _configure(converter, mode: str, representative=None):
    if mode not in MODES:
        raise UserInputError(f"Unknown TFLite mode {mode!r}. Known: {', '.join(MODES)}.")
    if mode == "float32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        samples = [np.asarray(x, np.float32) for x in (representative or [])]
        if not samples:
            raise UserInputError("int8 post-training quantization needs representative inputs.")

        def dataset():
            for x in samples:
                yield [x[None]]

        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def convert_saved_model(
    saved_model_dir, mode: str, representative=None, signature: str = "serving_default"
) -> bytes:
    """One of a SavedModel's signatures as a TFLite flatbuffer in ``mode``."""
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[signature]
    )
    return _configure(converter, mode, representative).convert()


def convert_function(concrete_function, trackable, mode: str, representative=None) -> bytes:
    """A concrete function (``trackable`` holds its variables) as a TFLite flatbuffer.
    ``representative``: for ``int8``, single inputs without the batch dimension."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete_function], trackable)
    return _configure(converter, mode, representative).convert()


def interpreter(model_path_or_bytes, num_threads: int | None = None, engine: str = "xnnpack"):
    """A ``tf.lite.Interpreter`` over a file or flatbuffer bytes, with the chosen kernels."""
    engine = resolve_engine(engine)
    kwargs = {"num_threads": num_threads}
    if engine == "litert":
        if not litert_available():
            raise UserInputError(
                "The litert engine needs the LiteRT runtime: pip install 'qn-keras[litert]' "
                "(or ai-edge-litert), or choose the xnnpack engine."
            )
        from ai_edge_litert.interpreter import Interpreter

        if isinstance(model_path_or_bytes, bytes | bytearray):
            return Interpreter(model_content=bytes(model_path_or_bytes), **kwargs)
        return Interpreter(model_path=str(_existing(model_path_or_bytes)), **kwargs)
    if engine == "builtin":
        # TFLite's own kernels, without the XNNPACK delegate it applies by default.
        kwargs["experimental_op_resolver_type"] = (
            tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    if isinstance(model_path_or_bytes, bytes | bytearray):
        return tf.lite.Interpreter(model_content=bytes(model_path_or_bytes), **kwargs)
    return tf.lite.Interpreter(model_path=str(_existing(model_path_or_bytes)), **kwargs)


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TFLite model not found: {path}")
    return path


class TFLiteModel:
    """Runs a one-input ``.tflite`` on arrays of any length along their dynamic axes; the
    interpreter is re-planned only when the input shape changes."""

    def __init__(self, model_path_or_bytes, num_threads: int | None = None, engine="xnnpack"):
        self.engine = resolve_engine(engine)
        self.interpreter = interpreter(model_path_or_bytes, num_threads, engine)
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        # The output's key in the model's signature ("logprobs", or "logits" for the
        # features-in models of qn optimize), where the converter recorded one.
        signatures = self.interpreter.get_signature_list()
        outputs = next(iter(signatures.values()))["outputs"] if signatures else []
        self.output_name = outputs[0] if len(outputs) == 1 else ""
        self._shape = None

    def __call__(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        if array.shape != self._shape:
            self.interpreter.resize_tensor_input(self._input, list(array.shape))
            self.interpreter.allocate_tensors()
            self._shape = array.shape
        self.interpreter.set_tensor(self._input, array)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis in float64, returned as float32: integer models' logits
    become log-probabilities without 8-bit rounding."""
    shifted = np.asarray(logits, np.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)
