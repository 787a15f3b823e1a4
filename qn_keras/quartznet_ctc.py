"""QuartzNet encoder plus CTC head, as one flat Functional model."""

from __future__ import annotations

import tensorflow as tf

from qn_keras.choices import HEAD_LAYER
from qn_keras.layers import LogSoftmax
from qn_keras.quartznet_backbone import build_encoder_graph, encoder_inputs, normalize_block_lists


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class QuartzNetCTC(tf.keras.Model):
    """QuartzNet CTC model: features and lengths to log-probabilities and output lengths.

    The encoder is :class:`QuartzNetBackbone`'s graph, built flat into this model (not nested)
    so that tfmot and checkpoint converters see every layer. The head is NeMo's
    ``ConvASRDecoder``: a 1x1 convolution with bias to ``vocabulary_size`` classes (labels plus
    the CTC blank, which is the last index), then log-softmax computed in float32.

    Inputs: ``features`` float32 ``[batch, time, num_features]``, ``feature_lengths`` int32
    ``[batch]``. Outputs: ``logprobs`` float32 ``[batch, frames, vocabulary_size]`` (frames at
    or past ``logprob_lengths`` are not meaningful) and ``logprob_lengths`` int32 ``[batch]``.

    Args:
        vocabulary_size: output classes including the blank (29 for NeMo's English labels).
        **backbone_kwargs: the :class:`QuartzNetBackbone` arguments (``lookahead`` among
            them: a model for stateful streaming).

    Example:
        >>> from qn_keras.presets import build_model
        >>> model = build_model("quartznet_5x5")
        >>> model.count_params()
        6713181

    Reference: QuartzNet, arXiv:1910.10261.
    """

    def __init__(
        self,
        vocabulary_size,
        stackwise_filters,
        stackwise_kernel_sizes,
        num_features=64,
        activation="relu",
        kernel_size_factor=1.0,
        se_reduction_ratio=8,
        lookahead=None,
        **kwargs,
    ):
        stackwise = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("stackwise_")}
        block_args = normalize_block_lists(
            stackwise_filters=stackwise_filters,
            stackwise_kernel_sizes=stackwise_kernel_sizes,
            **stackwise,
        )
        if int(vocabulary_size) < 2:
            raise ValueError(
                f"vocabulary_size must be >= 2 (labels + blank). Received: {vocabulary_size}"
            )
        features, lengths = encoder_inputs(num_features)
        encoded, encoded_lengths = build_encoder_graph(
            features,
            lengths,
            num_features=num_features,
            activation=activation,
            kernel_size_factor=kernel_size_factor,
            se_reduction_ratio=se_reduction_ratio,
            lookahead=lookahead,
            **block_args,
        )
        logits = tf.keras.layers.Dense(
            vocabulary_size, kernel_initializer="glorot_uniform", name=HEAD_LAYER
        )(encoded)
        logprobs = LogSoftmax(name="logprobs")(logits)
        out_lengths = tf.keras.layers.Activation("linear", dtype="int32", name="logprob_lengths")(
            encoded_lengths
        )
        super().__init__(inputs=[features, lengths], outputs=[logprobs, out_lengths], **kwargs)
        self.vocabulary_size = int(vocabulary_size)
        self.block_args = block_args
        self.num_features = num_features
        self.activation = activation
        self.kernel_size_factor = kernel_size_factor
        self.se_reduction_ratio = se_reduction_ratio
        self.lookahead = lookahead

    @property
    def blank_id(self) -> int:
        return self.vocabulary_size - 1

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "vocabulary_size": self.vocabulary_size,
            **self.block_args,
            "num_features": self.num_features,
            "activation": self.activation,
            "kernel_size_factor": self.kernel_size_factor,
            "se_reduction_ratio": self.se_reduction_ratio,
            "lookahead": self.lookahead,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)


def find_layer(model: tf.keras.Model, name: str):
    """The layer called ``name``, or the tfmot wrapper around it: quantization wraps a layer as
    ``quant_<name>``, pruning as ``prune_low_magnitude_<name>``; both keep it as ``.layer``."""
    for layer in model.layers:
        inner = getattr(layer, "layer", None)
        if layer.name in (name, f"quant_{name}") or getattr(inner, "name", None) == name:
            return layer
    raise ValueError(f"{model.name} has no layer {name!r}; is it a QuartzNetCTC model?")
