"""`qn optimize` jobs end to end on a tiny model and synthetic data: QAT and pruning through
the trainer, post-training int8 through the CLI, the report, and the serving exports."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from parity import assert_logprobs_close
from training_utils import REPO, TINY_MODEL, write_synthetic_tfrecord

from qn_cli.main import main as qn
from qn_keras.featurizer import FeaturizerConfig
from qn_keras.model_dir import ModelBundle, load_model_dir, save_model_dir
from qn_keras.optimization import prune as prune_lib
from qn_keras.optimization import recipes, report, tflite
from qn_keras.quartznet_ctc import QuartzNetCTC
from qn_keras.summary import trainable_parameters
from qn_keras.tokenizer import CharTokenizer
from qn_keras.training.config import TrainConfig

FINETUNE = {
    "augment": {"rect_masks": 0},
    "data": {"batch_size": 8, "eval_batch_size": 8, "bucket_boundaries": None},
    "training": {"checkpoint_every_steps": 1000, "log_every_steps": 1},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize")
    write_synthetic_tfrecord(root / "train.tfrecord", 16, seed=0)
    write_synthetic_tfrecord(root / "val.tfrecord", 6, seed=1)
    tf.keras.utils.set_random_seed(0)
    model = QuartzNetCTC(29, name="tiny", **TINY_MODEL["blocks"])
    save_model_dir(
        root / "float", ModelBundle(model, CharTokenizer(), FeaturizerConfig()), serving=False
    )
    return root


@pytest.fixture(scope="module")
def qat_dir(work):
    return recipes.run_qat(
        work / "float",
        work / "train.tfrecord",
        work / "val.tfrecord",
        work / "qat",
        scheme="int8_per_channel",
        steps=2,
        config=TrainConfig.from_dict(FINETUNE),
        progress=False,
    )


@pytest.fixture(scope="module")
def pruned_dir(work):
    return recipes.run_prune(
        work / "float",
        work / "train.tfrecord",
        work / "val.tfrecord",
        work / "pruned",
        target_sparsity=0.5,
        steps=4,
        end_fraction=0.5,
        frequency=1,
        config=TrainConfig.from_dict(FINETUNE),
        progress=False,
    )


def test_qat_job_writes_an_integer_tflite_and_a_serving_model(work, qat_dir):
    assert qat_dir == work / "qat" / "model"
    info = recipes.read_info(qat_dir)
    assert info["kind"] == "qat" and info["scheme"] == "int8_per_channel"
    assert info["steps"] == 2
    assert (work / "qat" / "finetune" / "training_report.json").is_file()
    ops = tflite.compute_op_types(qat_dir / recipes.TFLITE_FILE)
    # 4 depthwise, 4 pointwise, the residual 1x1, the last plain conv, the head
    assert len(ops) == 11 and all(o["input_dtype"] == "int8" for o in ops.values())

    # The serving SavedModel (waveform in, text out) runs the fake-quantized model.
    bundle = load_model_dir(qat_dir)
    served = tf.saved_model.load(str(qat_dir / "saved_model")).signatures["serving_default"]
    rng = np.random.default_rng(0)
    waveform = (0.1 * rng.normal(size=(1, 8000))).astype(np.float32)
    out = served(waveform=tf.constant(waveform), lengths=tf.constant([8000]))
    features, lengths = bundle.featurizer_layer()(waveform, tf.constant([8000]))
    expected = bundle.model([features, lengths])[0].numpy()
    assert_logprobs_close(out["logprobs"].numpy(), expected)
    assert out["transcripts"].shape == (1,)


def test_optimized_folder_loads_in_a_fresh_process(qat_dir):
    # load_model_dir must register tfmot's wrappers itself (nothing imported beforehand).
    code = (
        "import sys, numpy as np\n"
        "from qn_keras.model_dir import load_model_dir\n"
        f"m = load_model_dir({str(qat_dir)!r}).model\n"
        "print(type(m.layers[2]).__name__, m([np.zeros((1, 40, 64), 'float32'),"
        " np.array([40], 'int32')])[0].shape)\n"
    )
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "SavableQuantizeWrapper"


def test_prune_job_reaches_the_target_and_strips(work, pruned_dir):
    info = recipes.read_info(pruned_dir)
    bundle = load_model_dir(pruned_dir)
    assert isinstance(bundle.model, QuartzNetCTC)
    rows = prune_lib.layer_sparsity(bundle.model)
    assert rows == info["layer_sparsity"]
    pruned = [r for r in rows if r["pruned"]]
    assert {r["kind"] for r in pruned} == {"Conv2D", "Dense"}
    for r in pruned:
        assert abs(r["sparsity"] - 0.5) <= 1.0 / r["weights"] + 1e-9, r
    assert all(r["sparsity"] == 0 for r in rows if not r["pruned"])
    assert info["pruned_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert prune_lib.gzip_size(pruned_dir / "model.keras") < prune_lib.gzip_size(
        work / "float" / "model.keras"
    )
    assert info["val"]["utterances"] == 6
    assert (pruned_dir / "saved_model" / "saved_model.pb").is_file()


def test_ptq_cli_and_report(work, qat_dir, pruned_dir, capsys):
    out = work / "ptq"
    assert (
        qn(
            [
                "optimize",
                "ptq",
                "--model",
                str(work / "float"),
                "--out",
                str(out),
                "--mode",
                "int8",
                "--train",
                str(work / "train.tfrecord"),
                "--samples",
                "4",
            ]
        )
        == 0
    )
    ptq_dir = out / "model"
    assert recipes.read_info(ptq_dir)["representative_samples"] == 4
    ops = tflite.compute_op_types(ptq_dir / recipes.TFLITE_FILE)
    assert ops and all(o["input_dtype"] == "int8" for o in ops.values())

    report_dir = work / "report"
    configs = [str(work / "qat"), str(pruned_dir), str(out)]
    assert (
        qn(
            [
                "optimize",
                "report",
                "--configs",
                *configs,
                "--manifest",
                str(work / "val.tfrecord"),
                "--out",
                str(report_dir),
                "--limit",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    doc = json.loads((report_dir / report.REPORT_JSON).read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"int8_per_channel", "pruned50", "int8_ptq"}
    params = trainable_parameters(QuartzNetCTC(29, **TINY_MODEL["blocks"]))
    references = _first_references(work / "val.tfrecord", 4)
    for row in rows.values():
        assert row["params"] == params
        assert row["utterances"] == 4
        assert row["tflite_bytes"] == Path(row["path"], "model.tflite").stat().st_size
        assert row["mmacs"] == rows["pruned50"]["mmacs"] > 0
        # Scores and agreement recomputed here from the row's own model files, with an
        # independent edit distance (speeds are timings: reported, never asserted).
        tflite_hyps = _transcribe_tflite(Path(row["path"]) / "model.tflite", work, 4)
        keras_hyps = _transcribe_keras(Path(row["path"]), work, 4)
        assert row["wer"] == pytest.approx(_error_rate(references, tflite_hyps, str.split))
        assert row["cer"] == pytest.approx(_error_rate(references, tflite_hyps, _characters))
        assert row["keras_wer"] == pytest.approx(_error_rate(references, keras_hyps, str.split))
        same = np.mean([a == b for a, b in zip(tflite_hyps, keras_hyps, strict=True)])
        assert row["agreement"] == pytest.approx(same)
    fp32 = rows["pruned50"]  # a float32 model (with zeros)
    assert fp32["memory_mb"] == pytest.approx(4 * params / 1e6)
    assert fp32["mmacs_16bit"] == pytest.approx(4 * fp32["mmacs"])
    assert rows["int8_per_channel"]["mmacs_16bit"] == pytest.approx(fp32["mmacs"] / 4)
    assert rows["int8_per_channel"]["memory_mb"] < fp32["memory_mb"] / 3
    assert rows["int8_per_channel"]["integer_weighted_ops"] == 1.0
    assert rows["int8_ptq"]["integer_weighted_ops"] == 1.0
    assert fp32["integer_weighted_ops"] == 0.0
    assert fp32["nonzero_kernel_fraction"] < 0.6
    assert fp32["tflite_gzip_bytes"] < 0.8 * fp32["tflite_bytes"]
    table = (report_dir / report.REPORT_MD).read_text()
    assert all(f"| {name} |" in table for name in rows)
    for png in (report.PLOT_MEMORY, report.PLOT_MACS):
        head = (report_dir / png).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", head[16:24])[0] > 100
    assert "int8_per_channel" in capsys.readouterr().out


def test_cli_qat_and_prune_run_with_a_recipe_file(work, capsys):
    recipe = work / "finetune.yaml"
    recipe.write_text(json.dumps(FINETUNE))  # YAML is a superset of JSON
    common = ["--model", str(work / "float"), "--train", str(work / "train.tfrecord")]
    common += ["--val", str(work / "val.tfrecord"), "--steps", "1", "--config", str(recipe)]
    qat = ["optimize", "qat", *common, "--out", str(work / "cli_qat"), "--no-progress"]
    assert qn([*qat, "--scheme", "int8_per_tensor", "--name", "cli-int8"]) == 0
    out = capsys.readouterr().out
    assert "qn optimize qat: cli-int8 written to" in out
    assert recipes.read_info(work / "cli_qat" / "model")["scheme"] == "int8_per_tensor"
    prune = ["optimize", "prune", *common, "--out", str(work / "cli_pruned"), "--no-progress"]
    assert qn([*prune, "--target-sparsity", "0.5", "--end-fraction", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "sparsity of the pruned layers" in out and "val WER" in out
    assert (work / "cli_pruned" / "model" / recipes.TFLITE_FILE).is_file()


def test_cli_rejects_bad_input(work, capsys):
    assert (
        qn(
            [
                "optimize",
                "prune",
                "--model",
                str(work / "float"),
                "--train",
                "x",
                "--out",
                str(work / "bad"),
                "--target-sparsity",
                "1.5",
            ]
        )
        == 2
    )
    assert "--target-sparsity must be in (0, 1)" in capsys.readouterr().err
    assert (
        qn(["optimize", "qat", "--model", str(work), "--train", "x", "--out", str(work / "bad")])
        == 2
    )
    assert "is not a model folder" in capsys.readouterr().err
    assert (
        qn(
            [
                "optimize",
                "ptq",
                "--model",
                str(work / "float"),
                "--out",
                str(work / "bad"),
                "--mode",
                "int8",
            ]
        )
        == 2
    )
    assert "needs --train" in capsys.readouterr().err


def _edit_distance(a, b) -> int:
    """Levenshtein distance by the textbook recurrence (independent of qn_keras.metrics)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def _error_rate(references, hypotheses, split) -> float:
    errors = sum(
        _edit_distance(split(r), split(h)) for r, h in zip(references, hypotheses, strict=True)
    )
    return errors / sum(len(split(r)) for r in references)


def _characters(text: str) -> list[str]:
    return list(" ".join(text.split()))  # runs of spaces count as one


def _first_records(path, count):
    from qn_keras.data import schema

    records = [
        schema.parse_example_numpy(bytes(r.numpy()))
        for r in tf.data.TFRecordDataset(str(path)).take(count)
    ]
    return [(r["features"], r["transcript"]) for r in records]


def _first_references(path, count):
    return [text for _, text in _first_records(path, count)]


def _greedy(logprobs) -> str:
    labels = CharTokenizer().labels
    best = np.argmax(logprobs, axis=-1)
    kept = [k for i, k in enumerate(best) if (i == 0 or k != best[i - 1]) and k != len(labels)]
    return "".join(labels[k] for k in kept)


def _transcribe_tflite(path, work, count):
    runner = tflite.TFLiteRunner(path)
    return [_greedy(runner(f)) for f, _ in _first_records(work / "val.tfrecord", count)]


def _transcribe_keras(model_dir, work, count):
    model = load_model_dir(model_dir).model
    hyps = []
    for features, _ in _first_records(work / "val.tfrecord", count):
        logprobs, n = model([features[None], np.array([len(features)], np.int32)])
        hyps.append(_greedy(logprobs.numpy()[0, : int(n[0])]))
    return hyps
