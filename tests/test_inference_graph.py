"""The serving graph's rewritten encoder (qn_keras.inference_graph): same valid outputs as the
float64 NumPy reference and as the Keras model, in every architecture family, with and without
its TFLite options; refusals; the exported SavedModel uses it."""

import json

import numpy as np
import pytest
import reference_numpy as ref
import serving_utils as su
import tensorflow as tf
from parity import FLOAT64_REFERENCE_RTOL, worst_relative_error
from test_model_arithmetic import TINY, _layer_weights, _padded, _tiny

from qn_keras.featurizer import FeaturizerConfig
from qn_keras.inference import SpeechRecognizer
from qn_keras.inference_graph import InferenceEncoder, bfloat16_supported, unsupported_reason
from qn_keras.model_dir import ModelBundle
from qn_keras.presets import build_model
from qn_keras.quartznet_backbone import lookahead_padding
from qn_keras.quartznet_ctc import QuartzNetCTC
from qn_keras.tokenizer import CharTokenizer

LENGTHS = [37, 50, 51, 8]  # odd and even lengths through the stride-2 convs
FRAMES = 53


def _valid_errors(got, lengths, expected_for):
    worst = 0.0
    for b, n in enumerate(lengths):
        expected = expected_for(b)
        worst = max(worst, worst_relative_error(got[b, :n], expected))
    return worst


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("options", [{}, {"max_taps": 2}], ids=["serving", "split_taps"])
def test_rewrite_matches_the_numpy_reference_on_a_garbage_padded_batch(name, options):
    model = _tiny(name)
    config, weights = model.get_config(), _layer_weights(model)
    x = _padded(np.random.default_rng(1), LENGTHS, FRAMES, 123.0)
    encoder = InferenceEncoder(model, **options)
    # As a graph: Grappler's fusions (and their kernels) are what serving runs.
    got, got_lengths = (t.numpy() for t in tf.function(encoder)(x, np.array(LENGTHS, np.int32)))
    _, keras_lengths = model([x, np.array(LENGTHS, np.int32)], training=False)
    np.testing.assert_array_equal(got_lengths, keras_lengths.numpy())
    references = [ref.quartznet_forward(x[b, :n], config, weights) for b, n in enumerate(LENGTHS)]
    assert [r[1] for r in references] == list(got_lengths)
    worst = _valid_errors(got, got_lengths, lambda b: references[b][0])
    assert worst <= FLOAT64_REFERENCE_RTOL, f"rewrite vs reference: {worst:.2e} of frame scale"


@pytest.mark.parametrize("name", sorted(TINY))
def test_without_masks_on_valid_frames_only_equals_the_masked_batch(name):
    """The TFLite form: one utterance cropped to its valid frames needs no masks."""
    model = _tiny(name, seed=4)
    x = _padded(np.random.default_rng(2), LENGTHS, FRAMES, -55.0)
    masked = InferenceEncoder(model)
    got, got_lengths = (t.numpy() for t in masked(x, np.array(LENGTHS, np.int32)))
    bare = InferenceEncoder(model, max_taps=3, masks=False)
    for b, n in enumerate(LENGTHS):
        alone, alone_length = (t.numpy() for t in bare(x[b : b + 1, :n], np.array([n], np.int32)))
        assert alone_length[0] == got_lengths[b] == alone.shape[1]
        np.testing.assert_allclose(alone[0], got[b, : got_lengths[b]], rtol=1e-5, atol=1e-5)


def test_lookahead_models_keep_their_asymmetric_padding():
    model = QuartzNetCTC(vocabulary_size=29, lookahead=12, **su.TINY_BLOCKS)
    su.randomize_batch_norm(model, 5)
    right = lookahead_padding(model.block_args, 1.0, 12)
    features = np.random.default_rng(0).normal(size=(91, 64)).astype(np.float32)
    got, length = InferenceEncoder(model)(features[None], tf.constant([91]))
    expected, expected_length = ref.quartznet_forward(
        features, model.get_config(), _layer_weights(model), right_padding=right
    )
    assert int(length[0]) == expected_length
    np.testing.assert_allclose(got[0].numpy(), expected, atol=2e-4)


def test_the_5x5_preset_matches_the_keras_graph_within_1e_4():
    """The issue's parity bar: log-probs within 1e-4 of the unoptimized graph, same argmax."""
    tf.keras.utils.set_random_seed(0)
    model = build_model("quartznet_5x5")
    su.randomize_batch_norm(model, 1)
    x = np.random.default_rng(3).normal(size=(2, 300, 64)).astype(np.float32)
    lengths = np.array([300, 171], np.int32)
    want, want_lengths = (t.numpy() for t in model([x, lengths], training=False))
    got, got_lengths = (t.numpy() for t in InferenceEncoder(model)(x, lengths))
    np.testing.assert_array_equal(got_lengths, want_lengths)
    for b, n in enumerate(want_lengths):
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=1e-4)
        np.testing.assert_array_equal(got[b, :n].argmax(-1), want[b, :n].argmax(-1))


def test_models_it_cannot_rewrite_are_refused_and_served_as_they_are():
    from qn_keras.optimization import quantize_model

    model = _tiny("quartznet")
    assert unsupported_reason(model) is None
    quantized = quantize_model(model)
    reason = unsupported_reason(quantized)
    assert reason and "not a QuartzNetCTC" in reason
    with pytest.raises(ValueError, match="cannot rewrite"):
        InferenceEncoder(quantized)
    bundle = ModelBundle(model, CharTokenizer(list("abcdef")), FeaturizerConfig())
    plain = SpeechRecognizer(bundle, rewrite=False)
    assert plain.rewrite_refused == "disabled" and not hasattr(plain, "inference_encoder")


def test_serving_default_gives_the_keras_graphs_transcripts(tmp_path):
    tf.keras.utils.set_random_seed(2)
    model = QuartzNetCTC(vocabulary_size=29, **su.TINY_BLOCKS)
    su.randomize_batch_norm(model, 2)
    kernel, bias = model.get_layer("ctc_head_conv").get_weights()
    model.get_layer("ctc_head_conv").set_weights([kernel * 3.0, bias])  # non-blank outputs
    bundle = ModelBundle(model, CharTokenizer(), FeaturizerConfig())
    fast, slow = SpeechRecognizer(bundle), SpeechRecognizer(bundle, rewrite=False)
    assert fast.rewrite_refused is None
    rng = np.random.default_rng(0)
    waveform = (0.1 * rng.normal(size=(3, 24000))).astype(np.float32)
    lengths = tf.constant([24000, 13000, 4000])
    a, b = fast.serving_default(waveform, lengths), slow.serving_default(waveform, lengths)
    assert a["transcripts"].numpy().tolist() == b["transcripts"].numpy().tolist()
    assert any(a["transcripts"].numpy())
    np.testing.assert_array_equal(a["logprob_lengths"], b["logprob_lengths"])
    for i, n in enumerate(a["logprob_lengths"].numpy()):
        np.testing.assert_allclose(a["logprobs"][i, :n], b["logprobs"][i, :n], atol=1e-4)


def test_the_export_saves_only_the_folded_variables(tmp_path):
    from serving.export import export_model

    tf.keras.utils.set_random_seed(0)
    model = QuartzNetCTC(vocabulary_size=29, **su.TINY_BLOCKS)
    bundle = ModelBundle(model, CharTokenizer(), FeaturizerConfig())
    version = export_model(bundle, tmp_path, "tiny", tflite_modes=(), warmup=False)
    meta = json.loads((version / "assets.extra" / "qn_export.json").read_text())
    assert meta["encoder_graph"] == "rewritten"
    reader = tf.train.load_checkpoint(str(version / "variables" / "variables"))
    shapes = reader.get_variable_to_shape_map()
    saved = sum(int(np.prod(shape)) for name, shape in shapes.items() if "VARIABLE_VALUE" in name)
    # Folding removes the BN statistics and adds one bias per folded convolution.
    assert saved < model.count_params()


def _head_scaled_tiny(seed):
    tf.keras.utils.set_random_seed(seed)
    model = QuartzNetCTC(vocabulary_size=29, **su.TINY_BLOCKS)
    su.randomize_batch_norm(model, seed)
    kernel, bias = model.get_layer("ctc_head_conv").get_weights()
    model.get_layer("ctc_head_conv").set_weights([kernel * 3.0, bias])
    return model


@pytest.mark.skipif(bfloat16_supported() is not None, reason="needs oneDNN and AVX512-BF16 or AMX")
def test_bfloat16_serving_stays_close_to_float32():
    bundle = ModelBundle(_head_scaled_tiny(6), CharTokenizer(), FeaturizerConfig())
    full, half = SpeechRecognizer(bundle), SpeechRecognizer(bundle, precision="bfloat16")
    assert half.inference_encoder.head_kernel.dtype == tf.bfloat16
    waveform = (0.1 * np.random.default_rng(1).normal(size=(2, 32000))).astype(np.float32)
    lengths = tf.constant([32000, 20000])
    a, b = full.serving_default(waveform, lengths), half.serving_default(waveform, lengths)
    assert b["logprobs"].dtype == tf.float32
    for i, n in enumerate(a["logprob_lengths"].numpy()):
        x, y = a["logprobs"][i, :n].numpy(), b["logprobs"][i, :n].numpy()
        # bfloat16 keeps 8 significant bits: errors of a few 1/256 of the scale.
        assert np.abs(x - y).max() <= 0.05 * np.abs(x).max()
        assert (x.argmax(-1) == y.argmax(-1)).mean() >= 0.9


def test_bfloat16_is_refused_where_it_cannot_run(monkeypatch):
    import qn_keras.inference as inference
    from qn_keras.errors import UserInputError

    bundle = ModelBundle(_head_scaled_tiny(7), CharTokenizer(), FeaturizerConfig())
    monkeypatch.setattr(inference, "bfloat16_supported", lambda: "no AVX512-BF16 here")
    with pytest.raises(UserInputError, match="bfloat16: no AVX512-BF16 here"):
        SpeechRecognizer(bundle, precision="bfloat16")
    with pytest.raises(ValueError, match="compute_dtype"):
        InferenceEncoder(bundle.model, compute_dtype="float16")
