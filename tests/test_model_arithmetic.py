"""QuartzNet-family forward passes against the independent NumPy reference, masking, counts."""

import numpy as np
import pytest
import reference_numpy as ref
import tensorflow as tf
from parity import (
    FLOAT64_REFERENCE_RTOL,
    SAME_MODEL_RTOL,
    assert_logprobs_close,
    worst_relative_error,
)

from qn_keras.presets import PRESETS, build_model
from qn_keras.quartznet_backbone import QuartzNetBackbone
from qn_keras.summary import model_summary, trainable_parameters

VOCAB = 7

# Tiny stand-ins for each preset family; block lists as the presets spell them.
TINY = {
    # C1 stride 2 (the 16/16 vs 15/16 padding trap), a residual B-block, dilated C2, 1x1 C3
    "quartznet": dict(
        preset="quartznet_5x5",
        stackwise_filters=[16, 16, 24, 24],
        stackwise_kernel_sizes=[7, 5, 9, 1],
        stackwise_strides=[2, 1, 1, 1],
        stackwise_dilations=[1, 1, 2, 1],
        stackwise_repeats=[1, 3, 1, 1],
        stackwise_residual=[False, True, False, False],
        stackwise_separable=[True, True, True, False],
        stackwise_groups=[1, 1, 1, 1],
        stackwise_dropout=[0.0] * 4,
    ),
    # grouped pointwise convs followed by NeMo's GroupShuffle
    "grouped": dict(
        preset="quartznet_5x5_g2",
        stackwise_filters=[16, 16, 16, 24],
        stackwise_kernel_sizes=[7, 5, 5, 1],
        stackwise_strides=[2, 1, 1, 1],
        stackwise_dilations=[1, 1, 1, 1],
        stackwise_repeats=[1, 3, 2, 1],
        stackwise_residual=[False, True, True, False],
        stackwise_separable=[True, True, True, False],
        stackwise_groups=[1, 2, 4, 1],
        stackwise_dropout=[0.0] * 4,
    ),
    # Jasper DR: plain convs, dense residual from every earlier pane
    "jasper": dict(
        preset="jasper_10x5",
        stackwise_filters=[16, 16, 16, 16, 24, 24],
        stackwise_kernel_sizes=[5, 3, 3, 3, 5, 1],
        stackwise_strides=[2, 1, 1, 1, 1, 1],
        stackwise_dilations=[1, 1, 1, 1, 2, 1],
        stackwise_repeats=[1, 2, 2, 2, 1, 1],
        stackwise_residual=[False, True, True, True, False, False],
        stackwise_residual_dense=[False, True, True, True, False, False],
        stackwise_separable=[False] * 6,
        stackwise_dropout=[0.0] * 6,
    ),
    # ContextNet style: SE with global context and Swish everywhere, stride 2 inside a
    # residual block (residual 1x1 conv strides too, NeMo's 'stride_add')
    "contextnet": dict(
        preset="contextnet_5x5",
        stackwise_filters=[16, 16, 24, 24],
        stackwise_kernel_sizes=[5, 5, 5, 1],
        stackwise_strides=[2, 2, 1, 1],
        stackwise_dilations=[1, 1, 1, 1],
        stackwise_repeats=[1, 3, 2, 1],
        stackwise_residual=[False, True, True, False],
        stackwise_separable=[True, True, True, False],
        stackwise_se=[True] * 4,
        stackwise_dropout=[0.0] * 4,
        se_reduction_ratio=4,
    ),
}


def _tiny(name, seed=0, vocabulary_size=VOCAB):
    kwargs = dict(TINY[name])
    model = build_model(kwargs.pop("preset"), vocabulary_size=vocabulary_size, **kwargs)
    _randomize(model, seed)
    return model


def _randomize(model, seed):
    """Random weights and BN statistics far from the identity (moving var random positive)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = (w.shape for w in weights)
            weights = [
                rng.uniform(0.5, 1.5, gamma),
                rng.normal(0.0, 0.3, beta),
                rng.normal(0.0, 0.3, mean),
                rng.uniform(0.3, 2.0, var),
            ]
        else:
            weights = [
                rng.normal(0.0, 1.0 / np.sqrt(np.prod(w.shape[:-1])), w.shape) for w in weights
            ]
        layer.set_weights([w.astype(np.float32) for w in weights])


def _layer_weights(model):
    return {layer.name: layer.get_weights() for layer in model.layers if layer.get_weights()}


def _padded(rng, lengths, frames, pad_value):
    x = rng.normal(size=(len(lengths), frames, 64)).astype(np.float32)
    for b, n in enumerate(lengths):
        x[b, n:] = pad_value
    return x


def _ceil_div(n, d):
    return -(-n // d)


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_matches_reference_on_garbage_padded_batch(name):
    model = _tiny(name)
    config, weights = model.get_config(), _layer_weights(model)
    subsampling = int(np.prod(config["stackwise_strides"]))
    lengths = [37, 50, 51, 8]  # odd and even lengths through the stride-2 convs
    frames = 53
    x = _padded(np.random.default_rng(1), lengths, frames, 123.0)
    logprobs, out_lengths = model([x, np.array(lengths, np.int32)])
    logprobs, out_lengths = logprobs.numpy(), out_lengths.numpy()
    assert logprobs.dtype == np.float32 and logprobs.shape[2] == VOCAB
    expected_frames = frames
    for s in config["stackwise_strides"]:
        expected_frames = _ceil_div(expected_frames, s)
    assert logprobs.shape[1] == expected_frames
    worst = 0.0
    for b, n in enumerate(lengths):
        expected, expected_len = ref.quartznet_forward(x[b, :n], config, weights)
        assert out_lengths[b] == expected_len == _ceil_div(_ceil_div(n, 2), subsampling // 2)
        worst = max(worst, worst_relative_error(logprobs[b, : out_lengths[b]], expected))
        np.testing.assert_allclose(np.exp(logprobs[b, : out_lengths[b]]).sum(-1), 1.0, atol=1e-5)
    # float32 against float64: relative to each frame's scale (tests/parity.py).
    assert worst <= FLOAT64_REFERENCE_RTOL, f"keras vs reference: {worst:.2e} of frame scale"


def test_valid_outputs_do_not_depend_on_padding():
    model = _tiny("quartznet", seed=3)
    rng = np.random.default_rng(2)
    lengths = np.array([29, 44, 12], np.int32)
    clean = _padded(rng, lengths, 44, 0.0)
    garbage = clean.copy()
    for b, n in enumerate(lengths):
        garbage[b, n:] = 123.0
    longer = np.concatenate([garbage, np.full((3, 30, 64), -77.0, np.float32)], axis=1)
    out_clean, lens = (t.numpy() for t in model([clean, lengths]))
    out_garbage = model([garbage, lengths])[0].numpy()
    out_longer = model([longer, lengths])[0].numpy()
    for b, n in enumerate(lens):
        alone = model([clean[b : b + 1, : lengths[b]], lengths[b : b + 1]])[0].numpy()[0]
        # Same shapes, masked padding: bit for bit.
        assert np.abs(out_garbage[b, :n] - out_clean[b, :n]).max() == 0.0
        # Other shapes run other kernel blockings: equal up to float32 rounding.
        assert_logprobs_close(out_longer[b, :n], out_clean[b, :n], what="longer padding")
        assert_logprobs_close(alone[:n], out_clean[b, :n], what="alone vs in a batch")


def test_stride2_conv_pads_16_16_like_pytorch_not_15_16_like_keras_same():
    # Pitfall 5.1: for an even length, TF 'SAME' pads 15 left / 16 right on QuartzNet's
    # stride-2 K=33 conv; NeMo pads 16 / 16. Compare C1's depthwise output with both.
    model = build_model(
        "quartznet_5x5",
        vocabulary_size=VOCAB,
        stackwise_filters=[8, 8],
        stackwise_kernel_sizes=[33, 1],
        stackwise_strides=[2, 1],
        stackwise_repeats=[1, 1],
        stackwise_residual=[False, False],
        stackwise_separable=[True, False],
        stackwise_dilations=[1, 1],
        stackwise_groups=[1, 1],
        stackwise_dropout=[0.0, 0.0],
    )
    _randomize(model, 5)
    depthwise = model.get_layer("block_0_sub_0_depthwise")
    probe = tf.keras.Model(model.inputs, depthwise.output)
    x = np.random.default_rng(0).normal(size=(1, 40, 64)).astype(np.float32)
    got = probe([x, np.array([40], np.int32)]).numpy()[:, :, 0, :]
    kernel = depthwise.get_weights()[0]  # (33, 1, 64, 1)
    depthwise_torch = kernel[:, 0, :, 0].T[:, None, :]  # (64, 1, 33)
    symmetric = ref.conv1d(x[0].T, depthwise_torch, stride=2, padding=16, groups=64).T
    tf_same = tf.nn.depthwise_conv2d(x[:, :, None, :], kernel, [1, 2, 2, 1], "SAME").numpy()
    assert got.shape[1] == symmetric.shape[0] == 20
    # float32 conv against the float64 reference, relative to each frame's largest output.
    assert worst_relative_error(got[0], symmetric) < FLOAT64_REFERENCE_RTOL
    assert worst_relative_error(got[0], tf_same[0, :, 0, :]) > 100 * FLOAT64_REFERENCE_RTOL


def test_logprobs_are_float32_under_mixed_precision():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(
            "contextnet_5x5",
            vocabulary_size=VOCAB,
            stackwise_filters=[8, 8],
            stackwise_kernel_sizes=[3, 1],
            stackwise_strides=[2, 1],
            stackwise_repeats=[1, 1],
            stackwise_residual=[True, False],
            stackwise_separable=[True, False],
            stackwise_se=[True, False],
            stackwise_dilations=[1, 1],
            stackwise_dropout=[0.0, 0.0],
            se_reduction_ratio=4,
        )
        assert model.get_layer("block_0_sub_0_pointwise").compute_dtype == "float16"
        lengths = np.array([20, 13], np.int32)
        logprobs, out_lengths = model(
            [_padded(np.random.default_rng(0), lengths, 20, 0.0), lengths]
        )
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert logprobs.dtype == tf.float32
    assert out_lengths.dtype == tf.int32
    np.testing.assert_allclose(np.exp(logprobs.numpy()).sum(-1), 1.0, atol=1e-5)
    assert tf.keras.mixed_precision.global_policy().name == "float32"


def test_backbone_is_the_encoder_of_the_ctc_model():
    model = _tiny("quartznet", seed=6)
    config = {k: v for k, v in model.get_config().items() if k not in ("vocabulary_size", "name")}
    backbone = QuartzNetBackbone(**config)
    by_name = {layer.name: layer for layer in model.layers}
    for layer in backbone.layers:
        if layer.get_weights():
            layer.set_weights(by_name[layer.name].get_weights())
    lengths = np.array([31, 18], np.int32)
    x = _padded(np.random.default_rng(0), lengths, 31, 5.0)
    encoded, encoded_lengths = (t.numpy() for t in backbone([x, lengths]))
    kernel, bias = model.get_layer("ctc_head_conv").get_weights()
    logprobs, out_lengths = (t.numpy() for t in model([x, lengths]))
    np.testing.assert_array_equal(encoded_lengths, out_lengths)
    assert_logprobs_close(ref.log_softmax(encoded @ kernel + bias), logprobs, rtol=SAME_MODEL_RTOL)


def test_parameter_count_of_quartznet_10x5_is_pinned():
    # 5x5 (6,713,181) and 15x5 (18,924,381) are pinned in test_cli_core through
    # `qn model summary`, so each full-size model is built once.
    model = build_model("quartznet_10x5")
    assert trainable_parameters(model) == 12_818_781
    assert model.count_params() > 12_818_781  # BN moving statistics are not trainable


def test_ctc_head_adds_1025_parameters_per_output_class():
    counts = {}
    for vocabulary_size in (29, 34, 41):
        model = build_model(
            "quartznet_5x5",
            vocabulary_size=vocabulary_size,
            stackwise_filters=[8, 1024],
            stackwise_kernel_sizes=[3, 1],
            stackwise_strides=[2, 1],
            stackwise_repeats=[1, 1],
            stackwise_residual=[False, False],
            stackwise_separable=[True, False],
            stackwise_dilations=[1, 1],
            stackwise_groups=[1, 1],
            stackwise_dropout=[0.0, 0.0],
        )
        counts[vocabulary_size] = trainable_parameters(model)
        assert model.blank_id == vocabulary_size - 1
        kernel, bias = model.get_layer("ctc_head_conv").get_weights()
        assert kernel.shape == (1024, vocabulary_size) and bias.shape == (vocabulary_size,)
    assert counts[34] - counts[29] == 1025 * 5
    assert counts[41] - counts[29] == 1025 * 12


def test_macs_per_second_match_a_hand_count():
    model = build_model(
        "quartznet_5x5",
        vocabulary_size=5,
        stackwise_filters=[8, 16, 16],
        stackwise_kernel_sizes=[5, 3, 1],
        stackwise_strides=[2, 1, 1],
        stackwise_repeats=[1, 2, 1],
        stackwise_residual=[False, True, False],
        stackwise_separable=[True, True, False],
        stackwise_dilations=[1, 1, 1],
        stackwise_groups=[1, 2, 1],
        stackwise_dropout=[0.0] * 3,
    )
    rate = 50  # output frames per second after the stride-2 block (100 features/s)
    block0 = 64 * 5 + 64 * 8  # depthwise + pointwise
    block1 = (8 * 3 + 8 * 16 / 2) + (16 * 3 + 16 * 16 / 2) + 8 * 16  # 2 sub-blocks + residual
    block2 = 16 * 16  # plain 1x1
    head = 16 * 5
    summary = model_summary(model)
    assert summary["macs_per_second"] == rate * (block0 + block1 + block2 + head)
    assert summary["params"] == trainable_parameters(model)
    assert summary["subsampling"] == 2 and summary["output_frame_ms"] == 20


def test_bad_model_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown preset 'quartznet_7x7'.*quartznet_5x5"):
        build_model("quartznet_7x7")
    with pytest.raises(ValueError, match="stackwise_kernel_sizes has 2"):
        build_model(
            "quartznet_5x5",
            stackwise_filters=[8, 8, 8],
            stackwise_kernel_sizes=[3, 3],
            stackwise_strides=[2, 1, 1],
        )
    with pytest.raises(ValueError, match=r"Block 1: filters \(10\) must be divisible by groups"):
        build_model(
            "quartznet_5x5",
            stackwise_filters=[8, 10],
            stackwise_kernel_sizes=[3, 3],
            stackwise_strides=[2, 1],
            stackwise_dilations=[1, 1],
            stackwise_repeats=[1, 1],
            stackwise_residual=[False, False],
            stackwise_separable=[True, True],
            stackwise_groups=[1, 4],
            stackwise_dropout=[0.0, 0.0],
        )
    with pytest.raises(ValueError, match="stride > 1 with dilation > 1"):
        QuartzNetBackbone(
            stackwise_filters=[8], stackwise_kernel_sizes=[3], stackwise_strides=[2],
            stackwise_dilations=[2],
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"Block 0: kernel sizes must be odd.*Received: 4"):
        QuartzNetBackbone(stackwise_filters=[8], stackwise_kernel_sizes=[4])
    with pytest.raises(ValueError, match="activation must be one of"):
        QuartzNetBackbone(stackwise_filters=[8], stackwise_kernel_sizes=[3], activation="gelu")
    with pytest.raises(ValueError, match="vocabulary_size must be >= 2"):
        build_model("quartznet_5x5", vocabulary_size=1)


def test_presets_cover_the_issue():
    assert {"quartznet_5x5", "quartznet_10x5", "quartznet_15x5", "jasper_10x5"} <= set(PRESETS)
    assert {f"quartznet_{n}x5_g{g}" for n in (5, 10, 15) for g in (2, 4)} <= set(PRESETS)
    qn15 = PRESETS["quartznet_15x5"]
    # spec 1.1: C1, 15 B-blocks (K 33..75), C2 (K 87, dilation 2), C3 (1x1, not separable)
    assert qn15["stackwise_kernel_sizes"] == [33] + [33] * 3 + [39] * 3 + [51] * 3 + [63] * 3 + [
        75
    ] * 3 + [87, 1]
    assert qn15["stackwise_dilations"][-2:] == [2, 1]
    assert qn15["stackwise_separable"][-1] is False
    contextnet = PRESETS["contextnet_5x5"]
    assert all(contextnet["stackwise_se"]) and contextnet["activation"] == "swish"
