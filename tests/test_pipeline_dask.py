"""The feature job on a real distributed engine: Beam's DaskRunner on a dask.distributed
cluster (a scheduler and two single-threaded worker processes on 127.0.0.1, started and
stopped here) writes the same records, failures and dataset_info.json as the local runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pipeline_utils import bad_inputs, sample_data_subset, write_manifest

from pipeline.features_job import FeatureJobConfig, run_job
from qn_keras.data import schema

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("distributed", reason="the dask extra (requirements-dask.txt)")


@pytest.fixture(scope="module")
def cluster():
    from pipeline.dask_cluster import local_cluster

    with local_cluster(workers=2, threads=1, env={"PYTHONPATH": str(REPO)}) as address:
        yield address


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
