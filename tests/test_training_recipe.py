"""The recipe pieces: config loading, NeMo's cosine schedule, CTC loss reduction, augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from qn_keras.training.augment import (
    augment_batch,
    cutout_masks,
    frequency_masks,
    time_masks,
    time_warp,
)
from qn_keras.training.config import AugmentConfig, ConfigError, TrainConfig, load_config
from qn_keras.training.losses import ctc_loss_mean_batch, ctc_per_utterance
from qn_keras.training.schedules import CosineAnnealing

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------- config


def test_shipped_configs_load_with_nemo_defaults():
    config = load_config(REPO / "configs" / "quartznet_5x5.yaml")
    assert config.model.preset == "quartznet_5x5"
    opt = config.optimizer
    assert (opt.name, opt.learning_rate, opt.beta_1, opt.beta_2, opt.weight_decay) == (
        "novograd",
        0.01,
        0.8,
        0.5,
        0.001,
    )
    aug = config.augment
    assert (aug.rect_masks, aug.rect_time, aug.rect_freq) == (5, 120, 50)
    assert config.schedule.name == "cosine" and config.schedule.min_lr == 0.0
    assert config.training.precision == "float32" and config.data.batch_size == 32
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.model.blocks is not None or demo.model.preset is not None
    # An empty file is the default recipe.
    assert TrainConfig.from_dict({}).to_dict() == TrainConfig().to_dict()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optimiser": {}}, "Unknown key(s) ['optimiser'] in section 'config'"),
        ({"optimizer": {"lr": 0.1}}, "Unknown key(s) ['lr'] in section 'optimizer'"),
        ({"training": {"precision": "fp8"}}, "training.precision must be one of"),
        ({"training": {"epochs": "ten"}}, "training.epochs must be int"),
        ({"data": {"batch_size": 0}}, "data.batch_size must be >= 1"),
        ({"model": {"preset": "quartznet_7x7"}}, "Unknown preset 'quartznet_7x7'"),
        ({"model": {"preset": None}}, "exactly one of `preset`"),
        ({"schedule": {"warmup_steps": 5, "warmup_ratio": 0.1}}, "not both"),
        ({"featurizer": {"era": "future"}}, "Unknown front-end era"),
        ({"featurizer": {"mels": 80}}, "Unknown key(s) ['mels'] in section 'featurizer'"),
        ({"augment": {"time_width": 1.5}}, "augment.time_width"),
        ({"data": {"bucket_boundaries": [300, 100]}}, "increasing"),
    ],
)
def test_config_errors_name_the_problem(data, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    assert message in str(info.value)


def test_qn_train_reports_config_errors_in_one_line(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  epoch: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qn_cli", "train", "--config", str(config)]
        + ["--train", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=300,
    )
    assert proc.returncode == 2
    assert "qn train: error:" in proc.stderr and "Unknown key(s) ['epoch']" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_section_errors_without_building_a_model():
    from qn_keras.training.config import ModelConfig, architecture_from_config

    arch = architecture_from_config(ModelConfig(preset="quartznet_15x5"))
    assert len(arch["stackwise_filters"]) == 18 and arch["name"] == "quartznet_15x5"
    with pytest.raises(ConfigError, match=r"unknown model argument\(s\) \['stackwise_filterz'\]"):
        architecture_from_config(ModelConfig(overrides={"stackwise_filterz": [1]}))
    with pytest.raises(ConfigError, match="one entry per block"):
        architecture_from_config(
            ModelConfig(
                preset=None, blocks={"stackwise_filters": [8, 8], "stackwise_kernel_sizes": [3]}
            )
        )


def test_early_stopping_counts_validations_without_improvement():
    from qn_keras.training.loop_state import validations_without_improvement

    assert validations_without_improvement([0.9, 0.5, 0.6, 0.55]) == 2
    assert validations_without_improvement([0.9, 0.5, 0.49], min_delta=0.02) == 1
    assert validations_without_improvement([0.9, 0.8, 0.7]) == 0


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("training:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: Unknown key\(s\) \['epoch'\]"):
        load_config(typo)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n<space>\n")
    good = tmp_path / "good.yaml"
    good.write_text("labels: labels.txt\ntraining:\n  seed: 3\n")
    config = load_config(good)
    assert config.tokenizer().labels == ("a", "b", " ")
    assert config.replace(**{"training.seed": 4}).training.seed == 4


# --------------------------------------------------------------------------------- schedule


def nemo_cosine(step, base, max_steps, warmup, min_lr):
    """NeMo's CosineAnnealing (WarmupAnnealHoldPolicy.get_lr), transcribed independently."""
    if warmup > 0 and step <= warmup:
        return base * (step + 1) / (warmup + 1)
    if step > max_steps:
        return min_lr
    mult = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup)))
    return (base - min_lr) * mult + min_lr


@pytest.mark.parametrize(
    "kwargs, warmup",
    [
        ({}, 0),
        ({"warmup_steps": 10, "min_lr": 1e-4}, 10),
        ({"warmup_ratio": 0.25, "min_lr": 1e-3}, 25),
    ],
)
def test_cosine_annealing_matches_nemo(kwargs, warmup):
    schedule = CosineAnnealing(0.01, max_steps=100, **kwargs)
    min_lr = kwargs.get("min_lr", 0.0)
    steps = [0, 1, 5, 9, 10, 11, 25, 26, 50, 99, 100, 101, 250]
    got = [float(schedule(tf.constant(s))) for s in steps]
    want = [nemo_cosine(s, 0.01, 100, warmup, min_lr) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    # Serializable: a Keras optimizer with this schedule saves and reloads its config.
    config = tf.keras.optimizers.schedules.serialize(schedule)
    again = tf.keras.optimizers.schedules.deserialize(config)
    assert isinstance(again, CosineAnnealing) and again.get_config() == schedule.get_config()


def test_cosine_annealing_rejects_bad_settings():
    with pytest.raises(ValueError, match="shorter than max_steps"):
        CosineAnnealing(0.01, max_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="below min_lr"):
        CosineAnnealing(0.001, max_steps=10, min_lr=0.01)


# ------------------------------------------------------------------------------------- loss


def test_ctc_hand_case():
    # T=2 frames, classes {a, blank}; label "a": paths aa, a-, -a.
    p = np.array([[[0.6, 0.4], [0.3, 0.7]]], np.float32)
    logprobs = tf.math.log(p)
    loss = ctc_per_utterance(tf.constant([[0]]), tf.constant([1]), logprobs, tf.constant([2]))
    want = -math.log(0.6 * 0.3 + 0.6 * 0.7 + 0.4 * 0.3)
    np.testing.assert_allclose(loss.numpy(), [want], rtol=1e-6)


def test_mean_batch_reduction_matches_per_utterance_sums():
    rng = np.random.default_rng(0)
    batch, frames, classes = 4, 30, 6
    logits = rng.normal(size=(batch, frames, classes)).astype(np.float32)
    logprobs = tf.nn.log_softmax(logits)
    lengths = np.array([30, 22, 15, 9], np.int32)
    label_lengths = np.array([5, 3, 4, 1], np.int32)
    labels = rng.integers(0, classes - 1, size=(batch, 5)).astype(np.int32)
    garbage = labels.copy()
    for b in range(batch):  # what sits past each label length must not matter
        garbage[b, label_lengths[b] :] = classes - 2
    per_utt = []
    for b in range(
        batch
    ):  # independent reference: TF's dense CTC, one unpadded utterance at a time
        ref = tf.nn.ctc_loss(
            labels=tf.constant(labels[b : b + 1, : label_lengths[b]]),
            logits=logprobs[b : b + 1, : lengths[b]],
            label_length=tf.constant(label_lengths[b : b + 1]),
            logit_length=tf.constant(lengths[b : b + 1]),
            logits_time_major=False,
            blank_index=classes - 1,
        )
        per_utt.append(float(ref[0]))
    got = ctc_per_utterance(labels, label_lengths, logprobs, lengths).numpy()
    np.testing.assert_allclose(got, per_utt, rtol=1e-4)
    got_garbage = ctc_per_utterance(garbage, label_lengths, logprobs, lengths).numpy()
    np.testing.assert_allclose(got_garbage, per_utt, rtol=1e-4)
    mean_batch = float(ctc_loss_mean_batch(labels, label_lengths, logprobs, lengths))
    np.testing.assert_allclose(mean_batch, np.mean(per_utt), rtol=1e-5)


def test_infeasible_utterances_contribute_zero_like_zero_infinity():
    logprobs = tf.nn.log_softmax(tf.random.stateless_normal([3, 4, 5], seed=[1, 2]))
    labels = tf.constant([[1, 1, 0, 0, 0], [1, 2, 3, 0, 1], [1, 2, 0, 0, 0]])
    label_lengths = tf.constant([2, 5, 2])
    lengths = tf.constant([2, 4, 4])  # "1 1" needs 3 frames; 5 labels need >= 5 frames
    with tf.GradientTape() as tape:
        tape.watch(logprobs)
        losses = ctc_per_utterance(labels, label_lengths, logprobs, lengths)
        total = tf.reduce_sum(losses)
    grads = tape.gradient(total, logprobs).numpy()
    assert losses.numpy()[0] == 0 and losses.numpy()[1] == 0 and losses.numpy()[2] > 0
    assert np.isfinite(grads).all()
    assert np.abs(grads[:2]).max() < 1e-6 and np.abs(grads[2]).max() > 0


# ---------------------------------------------------------------------------------- augment


def _batch(lengths, frames=200, mels=64, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(lengths), frames, mels)).astype(np.float32) + 5.0
    for b, n in enumerate(lengths):
        features[b, n:] = 0.0
    return tf.constant(features), tf.constant(lengths, tf.int32)


def _spans(row):
    """(start, width) of the runs of True in a 1-D bool array."""
    runs, start = [], None
    for i, v in enumerate(list(row) + [False]):
        if v and start is None:
            start = i
        if not v and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_masks_stay_within_nemo_bounds():
    lengths = tf.constant([200, 130, 40, 7])
    shape = tf.constant([4, 200, 64])
    for s in range(8):
        seed = tf.constant([s, 1])
        fmask = frequency_masks(shape, seed, 1, 10).numpy()
        for row in fmask:
            assert all(w <= 10 for _, w in _spans(row))
        tmask = time_masks(shape, lengths, seed, 2, 25).numpy()
        for b, row in enumerate(tmask):
            assert not row[int(lengths[b]) :].any()
            assert row.sum() <= 50
        adaptive = time_masks(shape, lengths, seed, 1, 0.05).numpy()
        for b, row in enumerate(adaptive):
            assert row.sum() <= max(1, int(int(lengths[b]) * 0.05))
        rect = cutout_masks(shape, lengths, seed, 1, 120, 50).numpy()
        for b in range(4):
            rows, cols = rect[b].any(axis=1), rect[b].any(axis=0)
            # One rectangle: the mask is the product of one time span and one band.
            np.testing.assert_array_equal(rect[b], rows[:, None] & cols[None, :])
            assert len(_spans(rows)) <= 1 and len(_spans(cols)) <= 1
            assert rows.sum() <= 120 and cols.sum() <= 50
            if int(lengths[b]) >= 120:
                assert not rows[int(lengths[b]) :].any()


def test_augment_batch_masks_only_valid_frames_and_is_deterministic():
    features, lengths = _batch([200, 150, 60])
    config = AugmentConfig(freq_masks=2, time_masks=2, time_width=20, rect_masks=5, time_warp=5)
    out = augment_batch(features, lengths, config, tf.constant([3, 4])).numpy()
    again = augment_batch(features, lengths, config, tf.constant([3, 4])).numpy()
    other = augment_batch(features, lengths, config, tf.constant([3, 5])).numpy()
    assert out.shape == features.shape
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)
    for b, n in enumerate([200, 150, 60]):
        assert np.all(out[b, n:] == 0.0)
        assert (out[b, :n] == 0.0).any()  # something was masked (features are ~5 +- 1)
    assert augment_batch(features, lengths, AugmentConfig(rect_masks=0), [1, 2]) is features


def test_time_warp_keeps_endpoints_and_padding():
    features, lengths = _batch([120, 80, 9], frames=120)
    f = features.numpy()
    changed = [False, False]
    for s in range(4):
        warped = time_warp(features, lengths, tf.constant([s, 7]), 10).numpy()
        for b, n in enumerate([120, 80]):
            np.testing.assert_allclose(warped[b, 0], f[b, 0], rtol=1e-6)
            np.testing.assert_allclose(warped[b, n - 1], f[b, n - 1], rtol=1e-6)
            assert np.all(warped[b, n:] == 0)
            changed[b] |= not np.allclose(warped[b, :n], f[b, :n])
        np.testing.assert_array_equal(warped[2], f[2])  # too short to warp
    assert all(changed)
