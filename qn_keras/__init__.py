"""qn_keras: QuartzNet speech recognition models, featurizer, tokenizer and decoding for
TensorFlow/Keras 2.15. Imports no Beam or serving code."""

from qn_keras.featurizer import FeaturizerConfig, LogMelSpectrogram
from qn_keras.presets import PRESETS, build_model
from qn_keras.quartznet_backbone import QuartzNetBackbone
from qn_keras.quartznet_ctc import QuartzNetCTC
from qn_keras.tokenizer import ENGLISH_LABELS, CharTokenizer

__version__ = "0.1.0"

__all__ = [
    "ENGLISH_LABELS",
    "PRESETS",
    "CharTokenizer",
    "FeaturizerConfig",
    "LogMelSpectrogram",
    "QuartzNetBackbone",
    "QuartzNetCTC",
    "build_model",
]
