import tensorflow as tf


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class ConvLengths(tf.keras.layers.Layer):
    """Valid lengths after a 1-D convolution with symmetric padding, as NeMo computes them.

    ``trunc((L + 2*padding - dilation*(kernel_size-1) - 1) / stride) + 1``; stride-1 "same"
    convolutions leave lengths unchanged. For QuartzNet's stride-2 first conv this is ceil(L/2).

    Args:
        kernel_size, strides, dilation_rate, padding: the convolution's settings.
    """

    def __init__(self, kernel_size, strides=1, dilation_rate=1, padding=0, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.padding = padding

    def call(self, lengths):
        lengths = tf.cast(lengths, tf.int32)
        span = 2 * self.padding - self.dilation_rate * (self.kernel_size - 1) - 1
        if self.strides == 1 and span == -1:
            return lengths
        # truncating division, as torch does on the (possibly negative) float quotient
        numerator = lengths + span
        return tf.cast(tf.truncatediv(numerator, self.strides), tf.int32) + 1

    def get_config(self):
        config = super().get_config()
        config.update(
            kernel_size=self.kernel_size,
            strides=self.strides,
            dilation_rate=self.dilation_rate,
            padding=self.padding,
        )
        return config
