"""The feature job on a real distributed engine: Beam's DaskRunner on a dask.distributed
cluster (a scheduler and two single-threaded worker processes on 127.0.0.1, started and
stopped here) writes the same records, failures and dataset_info.json as the local runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_utils import bad_inputs, sample_data_subset, write_manifest

from pipeline.features_job import FeatureJobConfig, run_job
from qn_keras.data import schema

REPO = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")

pytest.importorskip("distributed", reason="the dask extra (requirements-dask.txt)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler on a port it picks itself (so no port can be taken from under it: it
    writes its address to the scheduler file) and two worker processes of one thread."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    common = ["--no-dashboard", "--scheduler-file", str(scheduler_file)]
    logs = [open(folder / f"{name}.log", "w") for name in ("scheduler", "workers")]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", *common],
            cwd=REPO,
            env=env,
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, (folder / "scheduler.log").read_text()
            time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [
                    str(DASK),
                    "worker",
                    "--nworkers",
                    "2",
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    *common,
                ],
                cwd=REPO,
                env=env,
                stdout=logs[1],
                stderr=subprocess.STDOUT,
            )
        )
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def _records(folder: Path) -> dict:
    import tensorflow as tf

    info = json.loads((folder / "dataset_info.json").read_text())
    out = {}
    for name in info["shards"]:
        for raw in tf.data.TFRecordDataset(str(folder / name)):
            record = schema.parse_example_numpy(raw.numpy())
            out[record["utt_id"]] = (
                record["features"].tobytes(),
                tuple(record["labels"]),
                record["transcript"],
                record["source"],
            )
    return out


def _made_of(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in ("created", "pipeline", "counters")}


def _failures(folder: Path) -> list:
    lines = (folder / "failures.jsonl").read_text().splitlines()
    return sorted((f["utt_id"] or "", f["reason"], f["source"]) for f in map(json.loads, lines))


@pytest.mark.slow
def test_dask_runner_matches_the_local_runner(cluster, tmp_path):
    records, raw_lines, expected = bad_inputs(tmp_path / "bad")
    bad = write_manifest(tmp_path / "bad" / "manifest.json", records, raw_lines)
    good = sample_data_subset(tmp_path, 12)
    config = dict(manifests=[good, bad], shards=3, oov="reject", max_duration=5.0)
    local = run_job(
        FeatureJobConfig(output_dir=str(tmp_path / "local"), **config), ["--runner=FnApiRunner"]
    )
    dask = run_job(
        FeatureJobConfig(output_dir=str(tmp_path / "dask"), **config),
        ["--runner", "dask", "--dask_client_address", cluster],
    )
    # Record for record (features bit for bit), failures by utterance and reason.
    got = _records(tmp_path / "dask")
    assert got == _records(tmp_path / "local")
    assert len(got) == 12 + sum(v is None for v in expected.values())
    assert _failures(tmp_path / "dask") == _failures(tmp_path / "local")
    assert {f[1] for f in _failures(tmp_path / "dask")} == {v for v in expected.values() if v}
    # dataset_info.json alike but for when and how it was made.
    assert _made_of(dask) == _made_of(local)
    assert sorted(os.listdir(tmp_path / "dask")) == sorted(os.listdir(tmp_path / "local"))
