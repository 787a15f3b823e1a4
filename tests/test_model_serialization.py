"""Every custom layer and model serializes; Keras and SavedModel round trips; model folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from parity import assert_logprobs_close

import qn_keras.model_dir
from qn_keras.featurizer import FeaturizerConfig, LogMelSpectrogram
from qn_keras.layers import ChannelShuffle, ConvLengths, LogSoftmax, SequenceMask, SqueezeExcite
from qn_keras.model_dir import ModelBundle, is_model_dir, load_model_dir, save_model_dir
from qn_keras.presets import build_model
from qn_keras.quartznet_backbone import QuartzNetBackbone
from qn_keras.quartznet_ctc import QuartzNetCTC
from qn_keras.tokenizer import CharTokenizer

# The smallest model holding every custom layer: SequenceMask, ConvLengths (stride 2),
# ChannelShuffle (groups 2), SqueezeExcite, LogSoftmax; residual, Swish.
MINI = dict(
    stackwise_filters=[8, 8],
    stackwise_kernel_sizes=[3, 1],
    stackwise_strides=[2, 1],
    stackwise_dilations=[1, 1],
    stackwise_repeats=[1, 1],
    stackwise_residual=[True, False],
    stackwise_separable=[True, False],
    stackwise_groups=[2, 1],
    stackwise_se=[True, False],
    stackwise_dropout=[0.0, 0.0],
    se_reduction_ratio=4,
    activation="swish",
)


def _mini(vocabulary_size=5, seed=0):
    model = build_model("quartznet_5x5", vocabulary_size=vocabulary_size, **MINI)
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.uniform(0.2, 1.0, w.shape).astype(np.float32) for w in model.get_weights()]
    )
    return model


def _inputs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 23, 64)).astype(np.float32)
    return x, np.array([23, 14], np.int32)


def _assert_same_outputs(a, b):
    """The same float32 model (reloaded, cloned, or as a SavedModel): equal lengths, values
    within rounding of each frame's scale (tests/parity.py; a reloaded SavedModel differs by
    ~4 ulps of the frame's largest value on AVX-512 kernels)."""
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert_logprobs_close(a[0].numpy(), b[0].numpy(), b[1].numpy(), what="outputs")


@pytest.mark.parametrize(
    "layer, inputs",
    [
        (ChannelShuffle(4, name="shuffle"), [tf.reshape(tf.range(24.0), [1, 3, 1, 8])]),
        (ConvLengths(33, 2, 1, 16, name="lengths"), [tf.constant([0, 1, 2, 7, 8, 33])]),
        (LogSoftmax(name="logprobs"), [tf.random.normal([2, 3, 5])]),
        (SequenceMask(name="mask"), [[tf.ones([2, 4, 1, 3]), tf.constant([1, 3])]]),
        (
            SqueezeExcite(8, 4, "swish", name="se"),
            [[tf.random.normal([2, 5, 1, 8]), tf.constant([5, 2])]],
        ),
    ],
)
def test_custom_layer_config_round_trip(layer, inputs):
    expected = layer(*inputs)
    assert tf.keras.saving.get_registered_name(type(layer)) == f"qn_keras>{type(layer).__name__}"
    config = layer.get_config()
    json.dumps(config)  # plain JSON, as .keras files store it
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    clone(*inputs)  # builds the clone's weights, if any
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(*inputs).numpy(), expected.numpy())
    generic = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(generic) is type(layer) and generic.get_config() == config


def test_small_layers_compute_what_nemo_does():
    # GroupShuffle: channel g * (C / groups) + i moves to i * groups + g
    x = tf.reshape(tf.range(8.0), [1, 1, 1, 8])
    shuffled = ChannelShuffle(2)(x).numpy().ravel().tolist()
    assert shuffled == [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
    # NeMo's length rule: trunc((L + 2p - d(k-1) - 1) / s) + 1, i.e. ceil(L/2) for C1
    lengths = ConvLengths(33, 2, 1, 16)(tf.constant([1, 2, 3, 100, 101])).numpy().tolist()
    assert lengths == [1, 1, 2, 50, 51]
    assert ConvLengths(87, 1, 2, 86)(tf.constant([5, 9])).numpy().tolist() == [5, 9]
    masked = SequenceMask()([tf.ones([2, 3, 1, 1]), tf.constant([1, 3])]).numpy()[..., 0, 0]
    assert masked.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


def test_models_rebuild_from_config():
    model = _mini()
    for cls, source in [(QuartzNetCTC, model), (QuartzNetBackbone, QuartzNetBackbone(**MINI))]:
        config = source.get_config()
        json.dumps(config)
        clone = cls.from_config(config)
        assert clone.get_config() == config
        assert [w.shape for w in clone.weights] == [w.shape for w in source.weights]
        assert [layer.name for layer in clone.layers] == [layer.name for layer in source.layers]
        clone.set_weights(source.get_weights())
        _assert_same_outputs(clone(_inputs()), source(_inputs()))


def test_keras_format_round_trip(tmp_path):
    model = _mini()
    model.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded) is QuartzNetCTC and loaded.blank_id == 4
    _assert_same_outputs(loaded(_inputs()), model(_inputs()))
    backbone = QuartzNetBackbone(**MINI)
    backbone.save(tmp_path / "backbone.keras")
    loaded_backbone = tf.keras.models.load_model(tmp_path / "backbone.keras")
    _assert_same_outputs(loaded_backbone(_inputs()), backbone(_inputs()))


def test_savedmodel_round_trip(tmp_path):
    # `tf.saved_model.save` writes no Keras metadata, so Keras reloads only what `model.save`
    # wrote in the SavedModel format; the `tf.saved_model.save` + `tf.saved_model.load` path
    # is checked through the serving SavedModel in test_model_dir_round_trip.
    model = _mini()
    model.save(tmp_path / "keras_savedmodel", save_format="tf")
    loaded = tf.keras.models.load_model(tmp_path / "keras_savedmodel")
    assert type(loaded) is QuartzNetCTC
    _assert_same_outputs(loaded(_inputs()), model(_inputs()))


def _bundle():
    tokenizer = CharTokenizer(" abcd")
    model = _mini(vocabulary_size=tokenizer.vocabulary_size)
    featurizer = FeaturizerConfig(era="legacy", dither=0.0)
    return ModelBundle(model, tokenizer, featurizer, {"note": "tiny", "steps": 3})


def test_model_dir_round_trip(tmp_path):
    bundle = _bundle()
    path = save_model_dir(tmp_path / "run" / "model", bundle, serving=True)
    assert is_model_dir(path)
    assert sorted(p.name for p in tmp_path.joinpath("run").iterdir()) == ["model"]
    loaded = load_model_dir(path)
    assert loaded.tokenizer.labels == bundle.tokenizer.labels
    assert loaded.featurizer == bundle.featurizer
    assert loaded.metadata == bundle.metadata
    _assert_same_outputs(loaded.model(_inputs()), bundle.model(_inputs()))
    # the serving SavedModel: waveform in, the same log-probs as featurizer + model in memory
    rng = np.random.default_rng(3)
    waveform = rng.normal(0.0, 0.1, size=(2, 4000)).astype(np.float32)
    lengths = np.array([4000, 2500], np.int32)
    features, feature_lengths = LogMelSpectrogram(**bundle.featurizer.to_dict())(waveform, lengths)
    expected = bundle.model([features, feature_lengths])
    served = tf.saved_model.load(str(path / "saved_model")).signatures["serving_default"](
        waveform=tf.constant(waveform), lengths=tf.constant(lengths)
    )
    _assert_same_outputs((served["logprobs"], served["logprob_lengths"]), expected)
    assert served["transcripts"].dtype == tf.string


def test_failed_save_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    bundle = _bundle()

    def broken(path, bundle, signatures=None):
        Path(path).mkdir()
        (Path(path) / "half_written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(qn_keras.model_dir, "save_serving_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model_dir(tmp_path / "model", bundle, serving=True)
    assert list(tmp_path.iterdir()) == []  # no final folder, no temporary left behind

    # an existing good folder survives a failed overwrite untouched
    save_model_dir(tmp_path / "model", bundle, serving=False)
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        save_model_dir(tmp_path / "model", bundle, serving=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
    _assert_same_outputs(
        load_model_dir(tmp_path / "model").model(_inputs()), bundle.model(_inputs())
    )
    with pytest.raises(FileExistsError):
        save_model_dir(tmp_path / "model", bundle, serving=False, overwrite=False)


def test_load_model_dir_rejects_what_is_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a qn-keras model folder"):
        load_model_dir(tmp_path / "empty")
    assert not is_model_dir(tmp_path / "empty")
