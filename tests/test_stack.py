"""The pinned stack has exactly one Keras (TF 2.15's own) and every library works with it."""

import importlib
import importlib.metadata
import importlib.util

import numpy as np
import tensorflow as tf


def test_exactly_one_keras():
    assert tf.__version__ == "2.15.1"
    # TF 2.15's tf.keras has no __version__; its layers come from the `keras` 2.15 package
    assert tf.keras.layers.Layer.__module__.startswith("keras.")
    assert importlib.import_module("keras").__version__.startswith("2.15")  # not Keras 3
    # tf-keras (pulled in by tfmot >= 0.8) would be a second Keras 2 beside TF's own
    assert importlib.util.find_spec("tf_keras") is None
    assert importlib.metadata.version("keras").startswith("2.15")


def test_every_library_imports():
    import apache_beam
    import keras_tuner
    import tensorflow_addons as tfa
    import tensorflow_io as tfio
    import tensorflow_model_optimization as tfmot

    assert apache_beam.__version__ == "2.77.0"
    assert keras_tuner.__version__ == "1.4.8"
    assert tfa.__version__ == "0.23.0"
    assert tfio.__version__ == "0.36.0"
    assert tfmot.__version__ == "0.7.5"


def test_addons_and_tfmot_accept_tf_keras_layers():
    import tensorflow_addons as tfa
    import tensorflow_model_optimization as tfmot

    inputs = tf.keras.Input((6, 1, 4))
    x = tf.keras.layers.Conv2D(4, (3, 1), padding="same", name="conv")(inputs)
    x = tf.keras.layers.DepthwiseConv2D((3, 1), padding="same", name="depthwise")(x)
    outputs = tf.keras.layers.Dense(3, name="dense")(x)
    model = tf.keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(2, 6, 1, 4)).astype(np.float32)

    quantized = tfmot.quantization.keras.quantize_model(model)
    assert any("quant" in layer.name for layer in quantized.layers)
    assert quantized(x).shape == (2, 6, 1, 3)

    normalized = tfa.layers.WeightNormalization(tf.keras.layers.Dense(3))
    assert normalized(tf.zeros([2, 4])).shape == (2, 3)
    optimizer = tfa.optimizers.NovoGrad(learning_rate=0.01)
    variable = tf.Variable([1.0, 2.0])
    optimizer.apply_gradients([(tf.constant([0.5, -0.5]), variable)])
    assert not np.allclose(variable.numpy(), [1.0, 2.0])
