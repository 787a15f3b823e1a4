"""The training loop in one process: learning, outputs, divergence, fine-tuning, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from training_utils import REPO, tiny_config, write_synthetic_tfrecord

from qn_keras.model_dir import load_model_dir
from qn_keras.training import ConfigError, TrainConfig, Trainer, TrainingDivergedError
from qn_keras.training.augment import augment_batch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_synthetic_tfrecord(root / "train.tfrecord", 32, seed=0)
    write_synthetic_tfrecord(root / "val.tfrecord", 8, seed=1)
    return root


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A tiny model trained for 3 epochs (with augmentation, which must stay in training)."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig.from_dict(
        tiny_config(
            augment={"rect_masks": 2, "rect_time": 5, "rect_freq": 8, "freq_masks": 1},
            training={"epochs": 3, "log_every_steps": 2},
        )
    )
    calls = []

    def counting(*args, **kwargs):  # counts traces: augmentation must be in the train step only
        calls.append(1)
        return augment_batch(*args, **kwargs)

    result = Trainer(
        config,
        out,
        str(corpus / "train.tfrecord"),
        str(corpus / "val.tfrecord"),
        progress=False,
        augment=counting,
    ).fit()
    return out, result, len(calls)


def test_tiny_model_learns_and_writes_outputs(base_run):
    out, result, augment_traces = base_run
    report = json.loads((out / "training_report.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert result.steps == report["steps"] == 24  # 32 utterances / batch 4, 3 epochs
    assert report["stopped_reason"] == "epochs" and report["epochs_completed"] == 3
    assert report["data"]["train"]["utterances"] == 32
    # Throughput leaves out the first step, which traces the graph: 23 timed steps of 4.
    assert report["throughput"]["timed_steps"] == 23
    assert report["config"]["optimizer"]["name"] == "novograd"
    losses = [h["loss"] for h in history["train"]]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    val = history["val"]
    assert [v["epoch"] for v in val] == [0, 1, 2] and val[-1]["loss"] < val[0]["loss"]
    assert report["best"]["wer"] == min(v["wer"] for v in val)
    assert (out / "curves.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    # Augmentation was traced into the training step only: validation never called it.
    assert augment_traces == 1

    bundle = load_model_dir(out / "model")
    assert bundle.metadata["best"]["step"] == report["best"]["step"]
    served = tf.saved_model.load(str(out / "model" / "saved_model"))
    outputs = served.signatures["serving_default"](
        waveform=tf.random.normal([1, 8000]) * 0.1, lengths=tf.constant([8000])
    )
    assert outputs["transcripts"].shape == (1,)


def test_restart_with_another_config_is_refused(base_run, corpus):
    out, _, _ = base_run
    config = TrainConfig.from_dict(tiny_config(optimizer={"learning_rate": 0.5}))
    with pytest.raises(ConfigError, match="different config"):
        Trainer(config, out, str(corpus / "train.tfrecord"), progress=False)


def test_max_minutes_is_one_budget_across_resumes(corpus, tmp_path):
    """The wall time trained so far is checkpointed, so a killed run that is resumed (as a
    tuner trial is) gets only the minutes it has left, not max_minutes again."""
    config = TrainConfig.from_dict(tiny_config(training={"epochs": 4}))
    data = str(corpus / "train.tfrecord")
    out = tmp_path / "out"
    clock = [0.0]

    def slow_clock():  # the first run "takes" 100 s per clock reading
        clock[0] += 100.0
        return clock[0]

    first = Trainer(config, out, data, progress=False, clock=slow_clock).fit(max_steps=2)
    assert first.stopped_reason == "max_steps"
    latest = tf.train.latest_checkpoint(str(out / "checkpoints"))
    spent = float(tf.train.load_variable(latest, "wall_seconds/.ATTRIBUTES/VARIABLE_VALUE"))
    assert spent >= 100.0  # more than the 1-minute budget below

    # With the real clock the 4 epochs (32 steps) take seconds; the 1-minute budget is
    # already spent, so the resumed run stops after its first step.
    second = Trainer(config, out, data, progress=False).fit(max_minutes=1.0)
    assert second.stopped_reason == "max_minutes"
    assert second.steps == 3
    resumed = float(
        tf.train.load_variable(
            tf.train.latest_checkpoint(str(out / "checkpoints")),
            "wall_seconds/.ATTRIBUTES/VARIABLE_VALUE",
        )
    )
    assert resumed > spent


def test_checkpoint_without_wall_time_still_resumes(corpus, tmp_path):
    """Checkpoints written before the wall time was kept resume (with no time counted)."""
    import shutil

    config = TrainConfig.from_dict(tiny_config(training={"epochs": 2}))
    data, out = str(corpus / "train.tfrecord"), tmp_path / "out"
    first = Trainer(config, out, data, progress=False)
    first.fit(max_steps=2)
    shutil.rmtree(out / "checkpoints")
    old_style = tf.train.Checkpoint(
        model=first.model,
        optimizer=first.optimizer,
        epoch=first.epoch_var,
        batch_in_epoch=first.batch_var,
    )
    tf.train.CheckpointManager(old_style, str(out / "checkpoints"), 3).save(checkpoint_number=2)
    second = Trainer(config, out, data, progress=False).fit(max_steps=3)
    assert second.steps == 3 and second.stopped_reason == "max_steps"


def test_corrupt_record_stops_before_the_step_that_would_use_it(corpus, tmp_path):
    """One NaN feature value in the third batch: the run stops naming the record and its
    shard before that batch is trained on, whatever the CPU's kernels do with NaN (oneDNN's
    fused BatchNorm+ReLU turns it into 0 and the loss stays finite)."""
    from qn_keras.data import CorruptRecordError, schema

    records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(corpus / "train.tfrecord"))]
    path = tmp_path / "nan.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, record in enumerate(records[:16]):
            if i == 9:  # third batch of 4 (no shuffling)
                item = schema.parse_example_numpy(record)
                features = item["features"].copy()
                features[2, 5] = np.nan
                record = schema.serialize_utterance(
                    features, item["labels"], item["transcript"], 1.0, "bad", "test"
                )
            writer.write(record)
    config = TrainConfig.from_dict(
        tiny_config(data={"shuffle": False}, training={"epochs": 2, "checkpoint_every_steps": 1})
    )
    trainer = Trainer(config, tmp_path / "out", str(path), progress=False)
    with pytest.raises(
        CorruptRecordError,
        match=rf"utterance 'bad' in {path}: 1 non-finite feature values",
    ):
        trainer.fit()
    checkpoints = tf.train.get_checkpoint_state(str(tmp_path / "out" / "checkpoints"))
    assert checkpoints.model_checkpoint_path.endswith("ckpt-2")
    assert not (tmp_path / "out" / "model").exists()
    # Nothing of the bad batch reached the weights: every variable is finite.
    assert all(np.all(np.isfinite(v.numpy())) for v in trainer.model.variables)


def test_diverging_loss_stops_before_any_checkpoint_of_the_bad_step(corpus, tmp_path):
    """Clean data, absurd learning rate: the weights blow up after the first update and the
    loss/gradient check stops the run before the diverged step is checkpointed."""
    import re

    config = TrainConfig.from_dict(
        tiny_config(
            optimizer={"learning_rate": 1e30},
            data={"shuffle": False},
            training={"epochs": 2, "checkpoint_every_steps": 1},
        )
    )
    trainer = Trainer(config, tmp_path / "out", str(corpus / "train.tfrecord"), progress=False)
    with pytest.raises(TrainingDivergedError, match=r"Training (loss|gradient norm) became") as e:
        trainer.fit()
    step = int(re.search(r"at step (\d+) \(epoch 1\)", str(e.value)).group(1))
    assert step >= 2  # the first step runs on the initial, finite weights
    checkpoints = tf.train.get_checkpoint_state(str(tmp_path / "out" / "checkpoints"))
    assert checkpoints.model_checkpoint_path.endswith(f"ckpt-{step - 1}")
    assert not (tmp_path / "out" / "model").exists()


def test_fine_tune_with_new_vocabulary_keeps_frozen_encoder(base_run, corpus, tmp_path):
    out, _, _ = base_run
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join([" ", *"abcdefghijklmnopqrstuvwxyz"]) + "\n")  # no apostrophe
    config = TrainConfig.from_dict(
        tiny_config(
            labels=str(labels), training={"epochs": 2, "freeze_encoder_steps": 3, "max_steps": 3}
        )
    )
    from qn_keras.tokenizer import ENGLISH_LABELS
    from qn_keras.training.data import from_tfrecords

    write_synthetic_tfrecord(tmp_path / "train27.tfrecord", 8, seed=3)
    data = from_tfrecords(str(tmp_path / "train27.tfrecord"))
    data.labels = list(ENGLISH_LABELS)
    with pytest.raises(ValueError, match="vocabulary"):
        Trainer(config, tmp_path / "ft0", data, init_from=out / "model", progress=False)
    data.labels = None  # the synthetic ids (< 26) mean the same letters in both vocabularies
    trainer = Trainer(config, tmp_path / "ft", data, init_from=out / "model", progress=False)
    result = trainer.fit()
    assert result.steps == 3
    init = load_model_dir(out / "model").model
    tuned = load_model_dir(tmp_path / "ft" / "model")
    assert tuned.tokenizer.labels == tuple([" ", *"abcdefghijklmnopqrstuvwxyz"])
    assert tuned.model.get_layer("ctc_head_conv").kernel.shape[-1] == 28
    for layer in init.layers:
        if layer.name == "ctc_head_conv" or not layer.trainable_weights:
            continue
        for a, b in zip(
            layer.trainable_weights,
            tuned.model.get_layer(layer.name).trainable_weights,
            strict=True,
        ):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_qn_evaluate_writes_worst_first(base_run, tmp_path):
    out, _, _ = base_run
    entries = _sample_entries(3)
    manifest = tmp_path / "dev3.json"
    manifest.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    results = tmp_path / "results.jsonl"
    proc = _qn_evaluate(out / "model", manifest, results)
    assert proc.returncode == 0, proc.stderr
    assert "WER:" in proc.stdout and "CER:" in proc.stdout
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["reference"] for r in rows) == sorted(e["text"] for e in entries)
    errors = [r["word_errors"] for r in rows]
    assert errors == sorted(errors, reverse=True)
    assert {"reference", "hypothesis", "word_errors", "cer"} <= set(rows[0])


def test_qn_evaluate_group_by_scores_each_voice(base_run, tmp_path):
    out, _, _ = base_run
    entries = _sample_entries(6)
    assert len({e["speaker"] for e in entries}) > 1
    manifest = tmp_path / "dev6.json"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    results = tmp_path / "results.jsonl"
    proc = _qn_evaluate(out / "model", manifest, results, "--group-by", "speaker")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    speaker_of = {_utt_id(e): e["speaker"] for e in entries}
    assert {r["utt_id"]: r["speaker"] for r in rows} == speaker_of
    for speaker in set(speaker_of.values()):
        mine = [r for r in rows if r["speaker"] == speaker]
        wer = sum(r["word_errors"] for r in mine) / sum(r["words"] for r in mine)
        cer = sum(r["char_errors"] for r in mine) / sum(r["chars"] for r in mine)
        line = next(x for x in proc.stdout.splitlines() if x.startswith(speaker + " "))
        assert line.split()[1:] == [str(len(mine)), f"{wer:.2%}", f"{cer:.2%}"]
    bad = _qn_evaluate(out / "model", tmp_path, results, "--group-by", "speaker")
    assert bad.returncode != 0 and "no *.trans.txt" in bad.stderr
    clash = _qn_evaluate(out / "model", manifest, results, "--group-by", "words")
    assert clash.returncode != 0 and "would overwrite that field" in clash.stderr


def _utt_id(entry):
    return entry["audio_filepath"].rsplit("/", 1)[-1].split(".")[0]


def test_qn_evaluate_reports_unusable_utterances_instead_of_scoring_them(base_run, tmp_path):
    import soundfile as sf

    out, _, _ = base_run
    entries = _sample_entries(2)
    loud = tmp_path / "loud.wav"
    waveform, rate = sf.read(entries[0]["audio_filepath"], dtype="float32")
    sf.write(loud, waveform * 1e30, rate, subtype="FLOAT")  # finite samples, features overflow
    entries.append({"audio_filepath": str(loud), "duration": entries[0]["duration"], "text": "x"})
    manifest = tmp_path / "dev3.json"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    results = tmp_path / "results.jsonl"
    proc = _qn_evaluate(out / "model", manifest, results)
    assert proc.returncode == 0, proc.stderr
    assert "utterances: 2" in proc.stdout and "rejected: 1" in proc.stdout
    assert "loud" in proc.stderr and "non-finite feature values" in proc.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [("error" in r) for r in rows] == [False, False, True]
    assert "hypothesis" not in rows[2] and rows[2]["reference"] == "x"


def _sample_entries(count):
    """The first sample_data dev manifest entries, with absolute audio paths."""
    lines = (REPO / "sample_data" / "dev.json").read_text().splitlines()[:count]
    entries = [json.loads(line) for line in lines]
    for e in entries:
        e["audio_filepath"] = str(REPO / "sample_data" / e["audio_filepath"])
    return entries


def _qn_evaluate(model, manifest, results, *extra):
    return subprocess.run(
        [sys.executable, "-m", "qn_cli", "evaluate", "--model", str(model)]
        + ["--manifest", str(manifest), "--output", str(results), "--no-progress", *extra],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=300,
    )


@pytest.mark.parametrize("horizon", ["auto", "steps"])
def test_a_time_budget_anneals_the_cosine_to_its_floor(corpus, tmp_path, horizon):
    """With --max-minutes the cosine's horizon follows the budget: the run ends at min_lr,
    not at its peak (schedule.horizon auto); "steps" keeps the epoch horizon."""
    config = TrainConfig.from_dict(
        tiny_config(
            schedule={"name": "cosine", "warmup_steps": 2, "min_lr": 0.0001, "horizon": horizon},
            training={"epochs": 50},
        )
    )
    clock = [0.0]

    def steady_clock():  # every reading 0.2 s later: a steady pace of fake time
        clock[0] += 0.2
        return clock[0]

    out = tmp_path / horizon
    result = Trainer(
        config, out, str(corpus / "train.tfrecord"), progress=False, clock=steady_clock
    ).fit(max_minutes=0.5)
    assert result.stopped_reason == "max_minutes"
    rates = [h["lr"] for h in json.loads((out / "history.json").read_text())["train"]]
    assert max(rates) == pytest.approx(0.02, rel=0.05)  # warmup reached the peak
    assert 10 < len(rates) < 300  # the budget, not the 400 steps of 50 epochs, ended the run
    if horizon == "auto":
        assert rates[-1] < 0.1 * max(rates)
        assert all(b <= a + 1e-9 for a, b in zip(rates[3:], rates[4:], strict=False))
    else:
        assert rates[-1] > 0.5 * max(rates)
