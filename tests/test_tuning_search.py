"""Architecture search end to end on the sample corpus, with tiny models and a few steps each:
constraint pruning, a search killed and resumed, and a chief plus a worker on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from training_utils import free_port

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data"

# Two tiny architectures (one or two sub-blocks per B-block, 16 to 64 channels); one
# optimizer step per trial: the tests check the search machinery, not accuracy.
TINY = """
space:
  blocks: 5
  repeats: [1, 2]
  groups: 1
  width: 0.0625
  kernel_factor: 0.25
  dropout: 0.0
  learning_rate: 0.01
search: {tuner: random, max_trials: 2, seed: 3}
constraints: {probe_seconds: 1.0, probe_repeats: 1}
train:
  augment: {rect_masks: 0}
  data: {batch_size: 8, eval_batch_size: 8, bucket_boundaries: null}
  training: {epochs: 1, max_steps: 1, log_every_steps: 1}
"""


def _manifest(split: str, count: int, target: Path) -> Path:
    lines = (SAMPLE / f"{split}.json").read_text().splitlines()[:count]
    with target.open("w") as f:
        for line in lines:
            record = json.loads(line)
            record["audio_filepath"] = str(SAMPLE / record["audio_filepath"])
            f.write(json.dumps(record) + "\n")
    return target


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_corpus")
    train = _manifest("train", 8, root / "train.json")
    dev = _manifest("dev", 4, root / "dev.json")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    return {"train": str(train), "dev": str(dev), "config": str(config)}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _tune_cmd(corpus, out, *extra):
    return [
        sys.executable, "-m", "qn_cli", "tune", "--config", corpus["config"],
        "--train", corpus["train"], "--val", corpus["dev"], "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def _trial_record(out: Path, trial_id: str) -> dict:
    path = out / "search" / f"trial_{trial_id}" / "qn_trial.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _leaderboard(out: Path) -> dict:
    return json.loads((out / "leaderboard.json").read_text())


def test_constraints_prune_trials_before_training(corpus, tmp_path):
    from qn_keras.tuning.config import load_tune_config
    from qn_keras.tuning.search import run_search

    out = tmp_path / "params"
    config = load_tune_config(corpus["config"], {"constraints": {"max_params": 1000}})
    summary = run_search(config, corpus["train"], corpus["dev"], out, progress=False)
    rows = _leaderboard(out)["trials"]
    assert [r["status"] for r in rows] == ["infeasible", "infeasible"]
    for row in rows:
        assert row["params"] > 1000
        assert "max_params 1,000" in row["reason"]
        # Reported to the oracle as a completed trial with the penalty score.
        assert row["score"] == config.search.penalty == 100.0
        assert not (out / "search" / f"trial_{row['trial_id']}" / "train").exists()
    assert summary["best_model_dir"] is None and summary["plot"] is None
    assert not (out / "cache").exists()  # nothing was featurized either
    assert "infeasible (params" in (out / "leaderboard.md").read_text()

    out = tmp_path / "speed"
    config = load_tune_config(
        corpus["config"], {"search": {"max_trials": 1}, "constraints": {"min_speed": 1e9}}
    )
    run_search(config, corpus["train"], corpus["dev"], out, progress=False)
    (row,) = _leaderboard(out)["trials"]
    assert row["status"] == "infeasible" and "min_speed" in row["reason"]
    # The reason quotes the speed the probe measured, which is the row's speed.
    assert row["reason"] == f"speed {row['speed']:.1f}x < min_speed 1e+09x"


@pytest.mark.parametrize("tuner", ["bayesian", "hyperband"])
def test_bayesian_and_hyperband_run_their_trials(corpus, tmp_path, tuner):
    from qn_keras.tuning.config import load_tune_config
    from qn_keras.tuning.search import run_search

    # Every model is pruned, so this runs each oracle's own logic without training: Bayesian
    # optimization's Gaussian process proposes trial 1; Hyperband gives trials epochs.
    overrides = {
        "search": {
            "tuner": tuner,
            "bayesian": {"num_initial_points": 1},
            "hyperband": {"max_epochs": 27, "factor": 9},
        },
        "constraints": {"max_params": 1000},
    }
    config = load_tune_config(corpus["config"], overrides)
    run_search(config, corpus["train"], corpus["dev"], tmp_path, progress=False)
    rows = _leaderboard(tmp_path)["trials"]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"infeasible"}
    for row in rows:
        record = _trial_record(tmp_path, row["trial_id"])
        # Hyperband's first bracket: ceil(27 / 9) epochs; otherwise the recipe's 1 epoch.
        assert record["epochs"] == (3 if tuner == "hyperband" else 1)
        assert row["score"] == 100.0


@pytest.mark.slow
def test_search_end_to_end_resumes_after_being_killed(corpus, tmp_path):
    out = tmp_path / "search"
    proc = subprocess.Popen(
        _tune_cmd(corpus, out),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # Kill it once the second trial has started (the first one is finished by then).
        deadline = time.monotonic() + 900
        while not _trial_record(out, "1") and proc.poll() is None:
            assert time.monotonic() < deadline, "the search never reached its second trial"
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert _trial_record(out, "0")["status"] == "completed"
    assert _trial_record(out, "1")["status"] == "running"
    assert not (out / "leaderboard.json").exists()

    # The same command again (here in-process) picks the search up where it stopped.
    from qn_keras.tuning.config import load_tune_config
    from qn_keras.tuning.search import run_search

    config = load_tune_config(corpus["config"])
    summary = run_search(config, corpus["train"], corpus["dev"], out)
    board = _leaderboard(out)
    rows = board["trials"]
    assert sorted(r["trial_id"] for r in rows) == ["0", "1"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert _trial_record(out, "0")["attempts"] == 1  # not trained again
    assert _trial_record(out, "1")["attempts"] == 2  # the interrupted trial was re-run
    assert {r["hyperparameters"]["repeats"] for r in rows} == {1, 2}
    for row in rows:
        # One step from random weights: WER can pass 100% (insertions), never the penalty.
        assert 0.0 <= row["val_wer"] < config.search.penalty and np.isfinite(row["val_loss"])
        assert row["params"] > 0 and row["macs_per_second"] > 0 and row["speed"] > 0
    assert rows[0]["val_wer"] <= rows[1]["val_wer"]
    assert [r["rank"] for r in rows] == [1, 2]
    # The smallest and the fastest model are on their fronts whatever their WERs.
    assert min(rows, key=lambda r: r["params"])["pareto_params"]
    assert min(rows, key=lambda r: r["latency_ms"])["pareto_latency"]
    # A deeper model has more parameters and MACs.
    by_r = {r["hyperparameters"]["repeats"]: r for r in rows}
    assert by_r[2]["params"] > by_r[1]["params"]
    assert by_r[2]["macs_per_second"] > by_r[1]["macs_per_second"]

    markdown = (out / "leaderboard.md").read_text()
    assert markdown.count("| completed |") == 2
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # The best model: a model folder with the best trial's weights and a serving SavedModel.
    import tensorflow as tf

    from qn_keras.model_dir import load_model_dir
    from qn_keras.tuning.search_space import architecture

    best = rows[0]
    assert summary["best_trial_id"] == board["best_trial_id"] == best["trial_id"]
    bundle = load_model_dir(out / "best_model")
    assert bundle.metadata["tuning"]["trial_id"] == best["trial_id"]
    assert bundle.metadata["tuning"]["val_wer"] == best["val_wer"]
    expected = architecture(best["hyperparameters"], config.space)
    model_config = bundle.model.get_config()
    assert model_config["stackwise_filters"] == expected["stackwise_filters"]
    assert model_config["stackwise_repeats"] == expected["stackwise_repeats"]
    trial_model = load_model_dir(best["model_dir"]).model
    for a, b in zip(bundle.model.get_weights(), trial_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    served = tf.saved_model.load(str(out / "best_model" / "saved_model"))
    waveform = tf.constant(np.random.default_rng(0).normal(0, 0.1, (1, 16000)), tf.float32)
    result = served.signatures["serving_default"](waveform=waveform, lengths=tf.constant([16000]))
    assert result["transcripts"].dtype == tf.string and result["transcripts"].shape == (1,)


@pytest.mark.slow
def test_chief_and_worker_on_localhost(corpus, tmp_path):
    out = tmp_path / "distributed"
    env = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    procs = {
        name: subprocess.Popen(
            _tune_cmd(corpus, out, "--max-trials", "1"),
            cwd=REPO,
            env=_env(KERASTUNER_TUNER_ID=name, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name in ("chief", "tuner0")
    }
    logs = {}
    try:
        # The worker first: if it fails, the chief would wait for its trial forever, so stop
        # the chief then and show the worker's log instead of timing out on the chief.
        logs["tuner0"] = procs["tuner0"].communicate(timeout=900)[0].decode()
        if procs["tuner0"].returncode != 0:
            os.killpg(procs["chief"].pid, signal.SIGKILL)
        logs["chief"] = procs["chief"].communicate(timeout=120)[0].decode()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{logs[name][-3000:]}"
    assert "the chief writes the leaderboard" in logs["tuner0"]
    (row,) = _leaderboard(out)["trials"]
    assert row["status"] == "completed"
    assert _trial_record(out, row["trial_id"])["tuner_id"] == "tuner0"  # trained by the worker
    assert (out / "best_model" / "saved_model" / "saved_model.pb").is_file()
    assert not (out / "cache" / "chief").exists()  # the chief only ran the oracle
