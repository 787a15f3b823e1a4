"""Quantization, folding and cost accounting of qn_keras.optimization on tiny models.

Each quantization scheme is built, trained for two steps, converted to TFLite and run; the
TFLite weights must be exactly the fake-quantized Keras weights (so at most 2^bits - 1 values
per channel) and every convolution must run on int8 activations.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from parity import assert_logprobs_close

from qn_keras.optimization import costs, tflite
from qn_keras.optimization.export_graph import export_graph
from qn_keras.optimization.graph import conv_head, fold_batchnorm
from qn_keras.optimization.quantize import get_scheme, quantize_model, quantized_kernels
from qn_keras.presets import preset_kwargs
from qn_keras.quartznet_ctc import QuartzNetCTC
from qn_keras.summary import macs_per_second, trainable_parameters

# Kernel 33 > 15 and 32 channels > 15, so a 4-bit grid is visible in the distinct-value count.
TINY = {
    "stackwise_filters": [32, 32, 48],
    "stackwise_kernel_sizes": [11, 33, 1],
    "stackwise_strides": [2, 1, 1],
    "stackwise_repeats": [1, 1, 1],
    "stackwise_residual": [False, True, False],
    "stackwise_separable": [True, True, False],
}


def tiny_model(seed=0, **overrides):
    tf.keras.utils.set_random_seed(seed)
    model = QuartzNetCTC(29, **{**TINY, **overrides})
    rng = np.random.default_rng(seed)
    # Trained-looking BatchNorm statistics, so that folding them is not a no-op.
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 2, c),
                    rng.normal(0, 0.5, c),
                    rng.normal(0, 0.5, c),
                    rng.uniform(0.5, 2, c),
                ]
            )
    return model


def batch(seed=0, lengths=(60, 41)):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(lengths), max(lengths), 64)).astype(np.float32)
    return features, np.asarray(lengths, np.int32)


def train_steps(model, steps=2, seed=0):
    """Two Adam steps of CTC on random data: the fake-quant ranges and weights move."""
    from qn_keras.training.losses import ctc_per_utterance

    features, lengths = batch(seed)
    labels = tf.constant([[1, 2, 3, 4], [5, 6, 0, 0]], tf.int32)
    label_lengths = tf.constant([4, 2], tf.int32)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            logprobs, out_lengths = model([features, lengths], training=True)
            loss = tf.reduce_mean(ctc_per_utterance(labels, label_lengths, logprobs, out_lengths))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return float(loss)


def test_fold_batchnorm_and_conv_head_keep_the_function():
    model = tiny_model(stackwise_groups=[1, 2, 1])
    features, lengths = batch()
    reference = model([features, lengths])[0].numpy()
    folded = fold_batchnorm(conv_head(model))
    assert not [x for x in folded.layers if isinstance(x, tf.keras.layers.BatchNormalization)]
    assert isinstance(folded.get_layer("ctc_head_conv"), tf.keras.layers.Conv2D)
    out = folded([features, lengths])[0].numpy()
    # Folding reorders the float32 arithmetic only (same-model tolerance, tests/parity.py).
    assert_logprobs_close(out, reference, lengths // 2)  # valid frames after the stride 2


@pytest.mark.parametrize("scheme", ["int8_per_tensor", "int4_per_channel"])
def test_qat_scheme_trains_converts_and_keeps_its_grid(scheme):
    spec = get_scheme(scheme)
    qat = quantize_model(tiny_model(), scheme)
    loss = train_steps(qat)
    assert np.isfinite(loss)
    blob = tflite.convert(qat, "qat")

    ops = tflite.compute_op_types(blob)
    assert len(ops) == 7  # 2 depthwise, 3 pointwise/plain, 1 residual, 1 head
    assert all(o["input_dtype"] == "int8" and o["weight_dtype"] == "int8" for o in ops.values())

    keras_kernels = quantized_kernels(qat)
    checked = 0
    for w in tflite.weight_tensors(blob):
        name = next(k for k in keras_kernels if f"quant_{k}/" in w["name"])
        kernel = keras_kernels[name]
        # Keras [kh, kw, in, out] (depthwise [kh, kw, C, 1]) -> TFLite [out, kh, kw, in]
        # (depthwise [1, kh, kw, C]): the same transpose.
        ref = np.transpose(kernel, (3, 0, 1, 2))
        scales = w["scales"].reshape([-1 if i == w["axis"] else 1 for i in range(4)])
        np.testing.assert_allclose(w["value"] * scales, ref, atol=1e-6, err_msg=name)
        bits = spec.bits_for(name)
        axis = w["axis"] if spec.per_channel else None
        groups = [w["value"]] if axis is None else np.moveaxis(w["value"], axis, 0)
        assert max(len(np.unique(g)) for g in groups) <= 2**bits - 1, name
        assert np.abs(w["value"]).max() <= 2 ** (bits - 1) - 1, name
        channels = ref.shape[w["axis"]]
        assert len(w["scales"]) == (channels if spec.per_channel else 1), name
        checked += 1
    assert checked == 7
    if scheme == "int4_per_channel":
        edge = [n for n in keras_kernels if n.startswith("block_0_") or n == "ctc_head_conv"]
        assert sorted(edge) == [
            "block_0_sub_0_depthwise",
            "block_0_sub_0_pointwise",
            "ctc_head_conv",
        ]

    features, _ = batch(1, lengths=(70,))
    logits = export_graph(qat)([features, np.array([70], np.int32)]).numpy()[0]
    logprobs = tflite.TFLiteRunner(blob)(features[0])
    expected = tf.nn.log_softmax(logits).numpy()
    # Integer and fake-quantized arithmetic may round one output step apart.
    assert np.abs(logprobs - expected).max() < 0.1
    assert np.mean(logprobs.argmax(-1) == expected.argmax(-1)) >= 0.9


def test_int8_ptq_is_integer_and_float16_stores_half_floats():
    model = tiny_model()
    rng = np.random.default_rng(3)
    representative = [rng.normal(size=(int(n), 64)).astype(np.float32) for n in (50, 80, 65)]
    int8 = tflite.convert(model, "int8", representative_features=representative)
    ops = tflite.compute_op_types(int8)
    assert ops and all(o["input_dtype"] == "int8" for o in ops.values())
    fp16 = tflite.convert(model, "float16")
    # float16 stores every weight and bias of the folded graph as float16 (dequantized at load),
    # plus the zero bias TFLite gives each bias-free depthwise conv.
    deployed = fold_batchnorm(conv_head(model))
    zero_biases = sum(
        int(np.prod(layer.depthwise_kernel.shape[2:]))
        for layer in deployed.layers
        if isinstance(layer, tf.keras.layers.DepthwiseConv2D) and not layer.use_bias
    )
    assert zero_biases == 64 + 32
    assert tflite.tensor_elements(fp16, "float16") == deployed.count_params() + zero_biases
    features = representative[0]
    out16 = tflite.TFLiteRunner(fp16)(features)
    keras = tf.nn.log_softmax(export_graph(model)([features[None], np.array([50])])).numpy()[0]
    np.testing.assert_allclose(out16, keras, atol=2e-2)
    with pytest.raises(ValueError, match="representative"):
        tflite.convert(model, "int8")


@pytest.mark.parametrize("engine", ["xnnpack", "litert"])
def test_int8_ptq_runs_on_each_engine_close_to_the_float_model(engine):
    """The integer model qn optimize ptq writes (rewritten graph: folded BN, depthwise pieces
    of <= 25 taps) on TensorFlow's TFLite and on LiteRT, whose VNNI kernels make int8 pay off:
    within int8 rounding of the float model, and the two runtimes within a few int8 steps."""
    model = tiny_model(seed=5)
    rng = np.random.default_rng(4)
    representative = [rng.normal(size=(int(n), 64)).astype(np.float32) for n in (60, 90, 75)]
    int8 = tflite.convert(model, "int8", representative_features=representative)
    features = representative[1]
    got = tflite.TFLiteRunner(int8, num_threads=2, engine=engine)(features)
    want = tf.nn.log_softmax(model([features[None], np.array([90])])[0]).numpy()[0]
    assert got.shape == want[: got.shape[0]].shape == (45, 29)
    scale = np.abs(want).max()
    assert np.abs(got - want[:45]).max() <= 0.03 * scale  # measured 0.6%
    assert (got.argmax(-1) == want[:45].argmax(-1)).mean() >= 0.9
    other = "litert" if engine == "xnnpack" else "xnnpack"
    twin = tflite.TFLiteRunner(int8, num_threads=1, engine=other)(features)
    assert np.abs(got - twin).max() <= 0.02 * scale
    float32 = tflite.TFLiteRunner(tflite.convert(model, "float32"), engine=engine)(features)
    np.testing.assert_allclose(float32, want[:45], atol=1e-4 * scale)


@pytest.mark.parametrize("preset", ["quartznet_5x5_g4", "jasper_10x5", "contextnet_5x5"])
def test_layer_macs_sum_to_the_summary(preset):
    kwargs = preset_kwargs(preset)
    # A narrow copy of the preset (same blocks, 1/8 of the channels) builds fast.
    kwargs["stackwise_filters"] = [max(8, f // 8) for f in kwargs["stackwise_filters"]]
    model = QuartzNetCTC(29, **kwargs)
    per_layer = costs.layer_macs(model)
    assert sum(per_layer.values()) == pytest.approx(macs_per_second(model), rel=1e-12)
    names = {layer.name for layer in model.layers}
    assert set(per_layer) - {n for n in per_layer if n.endswith("_se")} <= names


def test_memory_and_normalized_macs_follow_the_bit_widths():
    model = tiny_model()
    params = trainable_parameters(model)
    rows = costs.layer_parameters(model)
    kernels = sum(r["kernel"] for r in rows)
    other = sum(r["other"] for r in rows)
    assert kernels + other == params
    p = costs.PRECISIONS
    assert costs.memory_bytes(model, p["float32"]) == 4 * params
    assert costs.memory_bytes(model, p["float16"]) == 2 * params
    assert costs.memory_bytes(model, p["int8"]) == kernels + 4 * other
    edge = sum(
        r["kernel"]
        for r in rows
        if r["layer"].startswith("block_0_") or r["layer"] == "ctc_head_conv"
    )
    assert costs.memory_bytes(model, p["int4"]) == edge + (kernels - edge) / 2 + 4 * other
    macs = sum(costs.layer_macs(model).values())
    assert costs.normalized_macs(model, p["float16"]) == pytest.approx(macs)
    assert costs.normalized_macs(model, p["float32"]) == pytest.approx(4 * macs)
    assert costs.normalized_macs(model, p["int8"]) == pytest.approx(macs / 4)
    per_layer = costs.layer_macs(model)
    edge_macs = sum(
        v for k, v in per_layer.items() if k.startswith("block_0_") or k == "ctc_head_conv"
    )
    assert costs.normalized_macs(model, p["int4"]) == pytest.approx(
        edge_macs / 4 + (macs - edge_macs) / 8
    )


def test_pruned_zeros_survive_quantization_aware_training():
    from qn_keras.optimization.prune import PruneSchedule, prune_model, strip

    model = tiny_model()
    pruned = prune_model(model, PruneSchedule(target_sparsity=0.5, end_step=1, frequency=1))
    train_steps(pruned, steps=2)
    sparse = strip(pruned, like=tiny_model(seed=1))
    assert isinstance(sparse, QuartzNetCTC)
    zeros = {
        layer.name: layer.kernel.numpy() == 0
        for layer in sparse.layers
        if type(layer) is tf.keras.layers.Conv2D
    }
    assert all(abs(z.mean() - 0.5) < 0.05 for z in zeros.values()), {
        k: z.mean() for k, z in zeros.items()
    }
    qat = quantize_model(sparse, "int8_per_channel", preserve_sparsity=True)
    train_steps(qat, steps=2)
    kernels = quantized_kernels(qat)
    for name, mask in zeros.items():
        assert np.all(kernels[name][mask] == 0), name
        assert np.count_nonzero(kernels[name][~mask]) > 0.9 * (~mask).sum(), name
