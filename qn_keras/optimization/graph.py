"""Graph surgery on QuartzNetCTC models for quantization and TFLite export.

Both functions return new Functional models; weights are copied, the input model is unchanged.
"""

from __future__ import annotations

import tensorflow as tf

from qn_keras.choices import HEAD_LAYER as HEAD
from qn_keras.inference_graph import folded_conv_weights
from qn_keras.layers import LogSoftmax, SequenceMask
from qn_keras.quartznet_ctc import find_layer

LOGPROBS = "logprobs"


def as_functional(model: tf.keras.Model) -> tf.keras.Model:
    """A plain Functional model over the same layers (tfmot clones only plain graphs)."""
    if type(model).__name__ == "Functional":
        return model
    return tf.keras.Model(model.inputs, model.outputs, name=model.name)


def conv_head(model: tf.keras.Model) -> tf.keras.Model:
    """The model with its CTC head as a 1x1 ``Conv2D`` on ``[B, T, 1, C]`` instead of a ``Dense``.

    Same function, same layer names. Why: a ``Dense`` on a rank-3 tensor becomes a dynamically
    reshaped MatMul that the TFLite converter leaves in float (and the 8-bit quantized log-softmax
    after it with a fixed [-16, 0] range); a 1x1 convolution quantizes like every other conv, with
    per-channel scales. Models whose head is already a convolution are returned as they are.
    """
    model = as_functional(model)
    head = find_layer(model, HEAD)
    if not isinstance(head, tf.keras.layers.Dense):
        return model
    reshape = head._inbound_nodes[0].inbound_layers
    if not isinstance(reshape, tf.keras.layers.Reshape):
        raise ValueError(f"Expected a Reshape before {HEAD}, found {type(reshape).__name__}.")
    x = reshape.input
    units = head.units
    conv = tf.keras.layers.Conv2D(units, 1, use_bias=head.use_bias, name=HEAD)
    logits = tf.keras.layers.Reshape((-1, units), name=reshape.name)(conv(x))
    logprobs = LogSoftmax(name=LOGPROBS)(logits)
    outputs = [logprobs] + [
        t for t in model.outputs if t.node.layer.name != LOGPROBS
    ]  # the lengths output, untouched
    out = tf.keras.Model(model.inputs, outputs, name=model.name)
    kernel, *bias = head.get_weights()
    conv.set_weights([kernel.reshape(1, 1, *kernel.shape), *bias])
    return out


def fold_batchnorm(model: tf.keras.Model) -> tf.keras.Model:
    """The model with every BatchNormalization that directly follows a convolution folded into it.

    ``conv(x, W) -> BN`` becomes ``conv(x, W * s) + (beta - mean * s)`` with
    ``s = gamma / sqrt(var + eps)`` per output channel, and the BN layer disappears from the graph
    (its consumers read the convolution). Same function in inference mode.

    Why before quantization-aware training: tfmot 0.7.5's Conv+BN transforms do not fold; they
    only leave out the fake quantization between conv and BN, and the TFLite converter folds the BN
    into the already fake-quantized weights and re-quantizes them to int8 per channel. That is
    exact for 8-bit per-channel weights, but a 4-bit or per-tensor grid scaled per channel does
    not land on int8 steps, so the TFLite weights would not be the ones trained. Folding first,
    the fake quantizer sees the deployed weights.
    """
    model = as_functional(model)
    config = model.get_config()
    by_name = {layer["name"]: layer for layer in config["layers"]}
    uses = {}
    for layer in config["layers"]:
        for node in layer["inbound_nodes"]:
            for inbound in node:
                uses[inbound[0]] = uses.get(inbound[0], 0) + 1
    folds = {}
    for layer in config["layers"]:
        if layer["class_name"] != "BatchNormalization" or len(layer["inbound_nodes"]) != 1:
            continue
        node = layer["inbound_nodes"][0]
        source = by_name.get(node[0][0]) if len(node) == 1 else None
        if (
            source is not None
            and source["class_name"] in ("Conv2D", "DepthwiseConv2D")
            and source["config"].get("activation") == "linear"
            and uses.get(source["name"]) == 1
        ):
            folds[layer["name"]] = source["name"]
    if not folds:
        return model

    def rename(ref):
        return [folds.get(ref[0], ref[0]), *ref[1:]]

    layers = []
    for layer in config["layers"]:
        if layer["name"] in folds:
            continue
        if layer["name"] in folds.values():
            layer["config"]["use_bias"] = True
        layer["inbound_nodes"] = [[rename(ref) for ref in node] for node in layer["inbound_nodes"]]
        layers.append(layer)
    config["layers"] = layers
    config["output_layers"] = [rename(ref) for ref in config["output_layers"]]
    folded = tf.keras.Model.from_config(config)

    for layer in model.layers:
        if layer.name in folds or not layer.weights:
            continue
        target = folded.get_layer(layer.name)
        bn_name = next((bn for bn, conv in folds.items() if conv == layer.name), None)
        if bn_name is None:
            target.set_weights(layer.get_weights())
            continue
        bn = model.get_layer(bn_name)
        kernel = layer.get_weights()[0]
        bias = layer.get_weights()[1] if layer.use_bias else 0.0
        depthwise = isinstance(layer, tf.keras.layers.DepthwiseConv2D)
        scaled, folded_bias = folded_conv_weights(kernel, bn, bias, depthwise=depthwise)
        target.set_weights([scaled, folded_bias])
    return folded


class _PassThrough(tf.keras.layers.Layer):
    """Returns the first of its inputs: the export graph's stand-in for ``SequenceMask``."""

    def call(self, inputs):
        return inputs[0]


def _is_mask(layer) -> bool:
    return isinstance(layer, SequenceMask) or isinstance(
        getattr(layer, "layer", None), SequenceMask
    )
