"""The graph TFLite converts: a QuartzNetCTC model (float, pruned or fake-quantized) without
its sequence masks, its head as a 1x1 convolution, logits out.

Its own module because it needs both the graph surgery (:mod:`.graph`) and the quantization
scope (:mod:`.quantize`), which itself builds on the graph surgery: here neither imports the
other's dependants, so the package has no import cycle.
"""

from __future__ import annotations

import tensorflow as tf

from qn_keras.optimization.graph import LOGPROBS, _is_mask, _PassThrough, conv_head, find_layer
from qn_keras.optimization.quantize import quantize_scope, widen_low_bit_kernels


def export_graph(model: tf.keras.Model) -> tf.keras.Model:
    """``[features, lengths] -> logits`` for unpadded input, without sequence masks.

    Works on float, stripped-pruned and fake-quantized models. On a batch whose lengths all
    equal its number of frames every ``SequenceMask`` multiplies by ones, so dropping them
    changes nothing there; for integer TFLite it removes a float multiply (and a dequantize /
    quantize pair) before every convolution. The output is the head's logits: log-softmax is
    left to the caller so it runs in float even in an integer model.
    """
    model = conv_head(model)

    def clone(layer):
        if _is_mask(layer):
            return _PassThrough(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    with quantize_scope():
        copy = tf.keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.weights and not _is_mask(layer):
            copy.get_layer(layer.name).set_weights(layer.get_weights())
    widen_low_bit_kernels(copy)
    logits = find_layer(copy, LOGPROBS).input
    return tf.keras.Model(copy.inputs, logits, name=f"{model.name}_export")
