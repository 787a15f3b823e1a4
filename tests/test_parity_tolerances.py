"""The suite's parity tolerances (tests/parity.py) are loose enough for float32 rounding on
every CPU and tight enough to catch the mistakes a QuartzNet port makes: each mistake below is
made on purpose and must be flagged with a wide margin."""

from __future__ import annotations

import numpy as np
import pytest
import serving_utils as su
import tensorflow as tf
from parity import SAME_MODEL_RTOL, assert_logprobs_close, worst_relative_error

from qn_keras.quartznet_ctc import QuartzNetCTC

# A real mistake must exceed the tolerance by this factor, so that a kernel change that
# shifts rounding a little can never hide one.
MARGIN = 10


def _copy(model):
    clone = QuartzNetCTC.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


@pytest.fixture(scope="module")
def case():
    model = su.tiny_bundle().model
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 90, 64)).astype(np.float32)
    lengths = np.array([90, 61], np.int32)
    features[1, 61:] = rng.normal(0, 5, size=(29, 64))  # garbage in the padding
    logprobs, out_lengths = model([features, lengths], training=False)
    return model, features, lengths, logprobs.numpy(), out_lengths.numpy()


def test_same_model_in_a_graph_is_within_tolerance(case):
    model, features, lengths, logprobs, out_lengths = case
    graph = tf.function(lambda f, n: model([f, n], training=False))
    again, _ = graph(tf.constant(features), tf.constant(lengths))
    assert_logprobs_close(again.numpy(), logprobs, out_lengths)


def test_dropped_mask_is_caught(case):
    model, features, lengths, logprobs, out_lengths = case
    # Claiming the full length for item 1 is what a missing mask does: its padding leaks in.
    leaked, _ = model([features, np.array([90, 90], np.int32)], training=False)
    n = out_lengths[1]
    error = worst_relative_error(leaked.numpy()[1, :n], logprobs[1, :n])
    assert error > MARGIN * SAME_MODEL_RTOL, error


def test_wrong_batchnorm_epsilon_is_caught(case):
    model, features, lengths, logprobs, out_lengths = case
    wrong = _copy(model)
    for layer in wrong.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-3  # NeMo's
            layer.epsilon = 1e-5  # Keras's and PyTorch's default
    got, _ = wrong([features, lengths], training=False)
    with pytest.raises(AssertionError, match="of their frame's scale"):
        assert_logprobs_close(got.numpy(), logprobs, out_lengths)
    error = worst_relative_error(got.numpy()[0], logprobs[0])
    assert error > MARGIN * SAME_MODEL_RTOL, error


def test_missing_residual_is_caught(case):
    model, features, lengths, logprobs, out_lengths = case
    wrong = _copy(model)
    bn = wrong.get_layer("block_1_res_0_bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.zeros_like(gamma), np.zeros_like(beta), mean, var])  # branch gives 0
    got, _ = wrong([features, lengths], training=False)
    error = worst_relative_error(got.numpy()[0], logprobs[0])
    assert error > MARGIN * SAME_MODEL_RTOL, error
