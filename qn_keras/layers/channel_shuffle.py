import tensorflow as tf


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class ChannelShuffle(tf.keras.layers.Layer):
    """NeMo's ``GroupShuffle``: interleaves the channels of ``groups`` groups.

    Channel ``g * (C // groups) + i`` moves to ``i * groups + g``, so the next grouped pointwise
    convolution mixes information across groups. Shapes: ``[batch, time, 1, C]`` in and out.
    """

    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups

    def call(self, x):
        shape = tf.shape(x)
        channels = x.shape[-1]
        x = tf.reshape(x, [shape[0], shape[1], 1, self.groups, channels // self.groups])
        x = tf.transpose(x, [0, 1, 2, 4, 3])
        return tf.reshape(x, [shape[0], shape[1], 1, channels])

    def get_config(self):
        config = super().get_config()
        config.update(groups=self.groups)
        return config
