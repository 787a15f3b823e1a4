import tensorflow as tf


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class LogSoftmax(tf.keras.layers.Layer):
    """Log-softmax over the last axis, always in float32 (also under a mixed policy).

    Keras casts the floating input to this layer's float32 dtype before ``call``, so CTC loss
    and decoding see float32 log-probabilities however the encoder computed.
    """

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, x):
        return tf.nn.log_softmax(x, axis=-1)
