import tensorflow as tf


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class SequenceMask(tf.keras.layers.Layer):
    """Zeroes time steps at or past each sequence's length.

    NeMo's ``MaskedConv1d`` multiplies its input by this mask before every convolution, which is
    what makes valid outputs independent of how much padding a batch carries.

    Shapes: inputs ``[x, lengths]`` with ``x`` ``[batch, time, 1, channels]`` and ``lengths``
    int ``[batch]``; returns ``x`` with ``x[b, t] = 0`` for ``t >= lengths[b]``.
    """

    def call(self, inputs):
        x, lengths = inputs
        mask = tf.sequence_mask(lengths, maxlen=tf.shape(x)[1], dtype=x.dtype)
        return x * mask[:, :, None, None]
