"""Model optimization: quantization-aware training, pruning, post-training quantization,
TFLite export and the size / speed / accuracy report, with tensorflow-model-optimization.

Importing this package registers tfmot's wrappers and quantizers and this package's quantize
configs as Keras custom objects, so quantized and pruned models load with plain
``tf.keras.models.load_model`` (``qn_keras.model_dir.load_model_dir`` imports it for folders
whose metadata has an ``optimization`` entry).
"""

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from qn_keras.optimization.quantize import SCHEMES, QuantScheme, custom_objects, quantize_model


def _register_custom_objects() -> None:
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    scope = tfmot.quantization.keras.quantize_scope(custom_objects())
    registry = tf.keras.utils.get_custom_objects()
    for objects in scope.custom_objects:
        for name, obj in objects.items():
            registry.setdefault(name, obj)
    registry.setdefault("PruneLowMagnitude", pruning_wrapper.PruneLowMagnitude)


_register_custom_objects()

__all__ = ["SCHEMES", "QuantScheme", "custom_objects", "quantize_model"]
