import tensorflow as tf


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class SqueezeExcite(tf.keras.layers.Layer):
    """Squeeze-and-excitation with global context over valid frames (NeMo ``SqueezeExcite``).

    Pools the mean over ``t < length`` (padded frames excluded), then
    ``Dense(C // reduction_ratio, no bias) -> activation -> Dense(C, no bias) -> sigmoid``, and
    scales the input's channels. Computed in float32 as NeMo does with autocast off.

    Shapes: inputs ``[x, lengths]``, ``x`` ``[batch, time, 1, channels]``; returns ``x``'s shape.

    Args:
        channels: number of channels C.
        reduction_ratio: bottleneck ratio r (NeMo's default 8).
        activation: the block's activation ("relu" or "swish").

    Reference: ContextNet, arXiv:2005.03191.
    """

    def __init__(self, channels, reduction_ratio=8, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.reduction_ratio = reduction_ratio
        self.activation = activation
        self.squeeze = tf.keras.layers.Dense(
            channels // reduction_ratio, use_bias=False, dtype="float32", name="squeeze"
        )
        self.excite = tf.keras.layers.Dense(
            channels, use_bias=False, dtype="float32", name="excite"
        )
        self._activation_fn = tf.keras.activations.get(activation)

    def build(self, input_shape):
        self.squeeze.build([None, self.channels])
        self.excite.build([None, self.channels // self.reduction_ratio])
        super().build(input_shape)

    def call(self, inputs):
        x, lengths = inputs
        x32 = tf.cast(x, tf.float32)
        mask = tf.sequence_mask(lengths, maxlen=tf.shape(x)[1], dtype=tf.float32)
        count = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)
        pooled = tf.reduce_sum(x32[:, :, 0, :] * mask[:, :, None], axis=1) / count
        scale = tf.sigmoid(self.excite(self._activation_fn(self.squeeze(pooled))))
        return tf.cast(x32 * scale[:, None, None, :], x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            reduction_ratio=self.reduction_ratio,
            activation=self.activation,
        )
        return config
