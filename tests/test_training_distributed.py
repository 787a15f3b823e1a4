"""Training on several devices and surviving a kill, each in fresh Python processes (device
setup and TF_CONFIG must be in place before TensorFlow starts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from training_utils import REPO, free_port, tiny_config, write_synthetic_tfrecord

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_synthetic_tfrecord(root / "train.tfrecord", 16, seed=0)
    write_synthetic_tfrecord(root / "val.tfrecord", 8, seed=1)
    return root


MIRRORED = r"""
import json, sys, types
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
from training_utils import tiny_config
from qn_keras.training import TrainConfig, Trainer
from qn_keras.training.data import DataSource, from_tfrecords

config = TrainConfig.from_dict(tiny_config(training={"epochs": 2}))


def duplicated(source, copies):
    # Each global batch is the same 4 utterances `copies` times: with 2 replicas each replica
    # gets exactly what the single device gets, so the two runs must agree.
    def dataset(self, batch_size, **kwargs):
        kwargs.update(bucket_boundaries=None, drop_remainder=True)
        base = DataSource.dataset(self, batch_size // copies, **kwargs)
        repeat = lambda t: tf.concat([t] * copies, axis=0)
        return base.map(lambda x, y: (tuple(map(repeat, x)), tuple(map(repeat, y))))

    source.dataset = types.MethodType(dataset, source)
    return source


results = {}
for name, devices, copies in (("two", ["/cpu:0", "/cpu:1"], 2), ("one", ["/cpu:0"], 1)):
    data = duplicated(from_tfrecords(sys.argv[1]), copies)
    strategy = tf.distribute.MirroredStrategy(devices)
    trainer = Trainer(config, f"{sys.argv[2]}/{name}", data, strategy=strategy, progress=False,
                      export_serving=False)
    result = trainer.fit()
    variables = trainer.model.trainable_variables
    if name == "two":
        results["in_sync"] = all(
            np.array_equal(v.values[0].numpy(), v.values[1].numpy()) for v in variables
        )
        results["devices"] = sorted({d for v in variables for d in [x.device for x in v.values]})
    results[name] = {"steps": result.steps, "replicas": strategy.num_replicas_in_sync,
                     "loss": result.report["throughput"]}
    np.savez(f"{sys.argv[2]}/{name}.npz", *[v.numpy() for v in variables])
print("RESULT " + json.dumps(results))
"""


def test_mirrored_two_cpu_devices_matches_one_device(corpus, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(corpus / "train.tfrecord"), str(tmp_path)],
        env=ENV,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT ") :])
    assert results["two"]["replicas"] == 2 and results["one"]["replicas"] == 1
    assert results["two"]["steps"] == results["one"]["steps"] == 8
    assert results["in_sync"], "replica copies of a variable differ"
    assert len(results["devices"]) == 2
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert len(two.files) == len(one.files) > 10
    for key in one.files:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5)


WORKER = r"""
import json, sys
import numpy as np
sys.path.insert(0, "tests")
from training_utils import tiny_config
from qn_keras.training import TrainConfig, Trainer
from qn_keras.training.distribution import strategy_name

train, val, out, task = sys.argv[1:5]
config = TrainConfig.from_dict(
    tiny_config(training={"epochs": 3, "max_steps": 3, "checkpoint_every_steps": 2})
)
trainer = Trainer(config, out, train, val, progress=False, export_serving=False)
result = trainer.fit()
np.savez(f"{out}/worker{task}.npz", *[v.numpy() for v in trainer.model.trainable_variables])
print("RESULT " + json.dumps({
    "steps": result.steps, "reason": result.stopped_reason, "chief": trainer.is_chief,
    "strategy": strategy_name(trainer.strategy),
    "replicas": trainer.strategy.num_replicas_in_sync, "best": result.best,
}))
"""


def test_multi_worker_mirrored_two_processes(corpus, tmp_path):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    out = tmp_path / "run"
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER]
                + [str(corpus / "train.tfrecord"), str(corpus / "val.tfrecord"), str(out)]
                + [str(index)],
                env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
                cwd=str(REPO),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=400)
            assert proc.returncode == 0, stderr[-3000:]
            line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
            outputs.append(json.loads(line[len("RESULT ") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for result in outputs:
        assert result["strategy"] == "MultiWorkerMirroredStrategy"
        assert result["replicas"] == 2
        # 16 utterances, global batch 8: 2 steps per epoch; max_steps stops both mid-epoch 2.
        assert result["steps"] == 3 and result["reason"] == "max_steps"
    assert [r["chief"] for r in outputs] == [True, False]
    assert outputs[0]["best"] == outputs[1]["best"]
    a, b = np.load(out / "worker0.npz"), np.load(out / "worker1.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    # Only the chief writes the run's files; its checkpoints include the mid-epoch one.
    report = json.loads((out / "training_report.json").read_text())
    assert report["strategy"]["replicas"] == 2 and report["steps"] == 3
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.index")) == [
        "ckpt-2.index",
        "ckpt-3.index",
    ]


TRAIN = r"""
import sys
from qn_keras.training import Trainer, load_config

config, data, out = sys.argv[1:4]
Trainer(load_config(config), out, data, export_serving=False).fit()
"""


def _train_command(config_path, data, out):
    # `qn train` without the serving export, for the reference run.
    return [sys.executable, "-c", TRAIN, str(config_path), str(data), str(out)]


def _qn_train(config_path, data, out):
    return [sys.executable, "-m", "qn_cli", "train", "--config", str(config_path)] + [
        "--train",
        str(data),
        "--out",
        str(out),
    ]


def test_killed_run_resumes_mid_epoch_like_an_uninterrupted_one(corpus, tmp_path):
    config = tiny_config(
        augment={"rect_masks": 1, "rect_time": 4, "rect_freq": 6},
        training={"epochs": 3, "checkpoint_every_steps": 3},
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    data = corpus / "train.tfrecord"
    # 16 utterances, batch 4: 4 steps per epoch, 12 in all; checkpoints every 3 steps and at
    # each epoch end. The reference runs alongside the run that gets killed.
    reference = subprocess.Popen(
        _train_command(config_path, data, tmp_path / "reference"),
        env=ENV,
        cwd=str(REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        _qn_train(config_path, data, tmp_path / "run"),
        env=ENV,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in victim.stdout:
            if "checkpoint saved at step 6 " in line:
                victim.send_signal(signal.SIGKILL)
                break
        victim.wait(timeout=300)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "model").exists()

    resumed = subprocess.run(
        _qn_train(config_path, data, tmp_path / "run"),
        env=ENV,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resume_line = next(x for x in resumed.stdout.splitlines() if x.startswith("Resuming from"))
    step = int(resume_line.split("step ")[1].split(",")[0])
    assert 6 <= step < 12
    assert "qn train: 12 steps, stopped by epochs" in resumed.stdout
    assert (tmp_path / "run" / "model" / "saved_model" / "saved_model.pb").exists()
    report = json.loads((tmp_path / "run" / "training_report.json").read_text())
    assert report["steps"] == 12 and report["resumed_from_step"] == step
    assert report["steps_this_run"] == 12 - step
    # The kill lands at step 6 or a little later; wherever it landed, the run resumes from the
    # last checkpoint with the position in the epoch that step implies (4 steps per epoch;
    # a checkpoint at an epoch's end resumes at batch 0 of the next).
    assert f"epoch {step // 4 + 1}, batch {step % 4} of the epoch" in resume_line

    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    from qn_keras.model_dir import load_model_dir

    a = load_model_dir(tmp_path / "run" / "model").model.get_weights()
    b = load_model_dir(tmp_path / "reference" / "model").model.get_weights()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
