"""The names of the choices users make in configs and on the command line, owned here and
imported by the modules that implement them. This module imports nothing, so `qn --help`,
Beam's option parsing and config validation need neither TensorFlow nor tfmot.
"""

# Featurizer eras: NeMo >= 1.0's front end ("current") and the one before it ("legacy").
ERAS = ("current", "legacy")

# What happens to transcript characters outside the labels: dropped (and counted) or the
# utterance rejected.
OOV_POLICIES = ("drop", "reject")

# Quantization-aware training schemes (qn_keras.optimization.quantize.SCHEMES).
QAT_SCHEMES = ("int8_per_channel", "int8_per_tensor", "int4_per_channel")

# Post-training TFLite conversions of a model folder (`qn optimize ptq --mode`).
PTQ_MODES = ("float32", "float16", "dynamic", "int8")

# TFLite files `qn export --tflite` writes beside a TF Serving version (waveform in).
EXPORT_TFLITE_MODES = ("float32", "float16", "dynamic")

# The CTC head layer of every QuartzNetCTC model (a Dense over channels: a 1x1 convolution,
# NeMo's decoder). Saved models and checkpoints refer to it by this name.
HEAD_LAYER = "ctc_head_conv"
