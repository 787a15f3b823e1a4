"""Small registered layers the QuartzNet graph is built from."""

from qn_keras.layers.channel_shuffle import ChannelShuffle
from qn_keras.layers.conv_lengths import ConvLengths
from qn_keras.layers.log_softmax import LogSoftmax
from qn_keras.layers.sequence_mask import SequenceMask
from qn_keras.layers.squeeze_excite import SqueezeExcite

__all__ = ["ChannelShuffle", "ConvLengths", "LogSoftmax", "SequenceMask", "SqueezeExcite"]
