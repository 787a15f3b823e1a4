"""qn_keras: QuartzNet speech recognition models, featurizer, tokenizer and decoding for
TensorFlow/Keras 2.15. Imports no Beam or serving code."""

import importlib

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so that `import qn_keras.choices` or the manifest
# readers (Beam workers, `qn --help`) do not pay for TensorFlow.
_EXPORTS = {
    "FeaturizerConfig": "qn_keras.featurizer",
    "LogMelSpectrogram": "qn_keras.featurizer",
    "PRESETS": "qn_keras.presets",
    "build_model": "qn_keras.presets",
    "QuartzNetBackbone": "qn_keras.quartznet_backbone",
    "QuartzNetCTC": "qn_keras.quartznet_ctc",
    "ENGLISH_LABELS": "qn_keras.tokenizer",
    "CharTokenizer": "qn_keras.tokenizer",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qn_keras' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


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
