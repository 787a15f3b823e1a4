"""The feature job end to end: the project's sample corpus through the job and back through the reader, every
kind of bad input through `qn features`, and what an interrupted run leaves behind."""

import json
import os

import numpy as np
import pytest
from pipeline_utils import (
    bad_inputs,
    sample_data_subset,
    tone,
    write_manifest,
    write_wav,
)

import pipeline.features_job as features_job
from pipeline.features_job import FeatureJobConfig, run_job
from qn_cli.main import main as qn_main
from qn_keras.audio import decode_audio
from qn_keras.data import load_utterances, read_dataset_info, tfrecord_dataset
from qn_keras.featurizer import FeaturizerConfig, featurize
from qn_keras.tokenizer import CharTokenizer

BEAM_ARGS = ["--runner=FnApiRunner"]


def _read_back(folder):
    got = {}
    ds = tfrecord_dataset(folder, 8, deterministic=True, with_metadata=True)
    for (feats, feat_lens), (labels, label_lens), meta in ds:
        for b in range(feats.shape[0]):
            got[meta["utt_id"][b].numpy().decode()] = (
                feats[b, : feat_lens[b]].numpy(),
                labels[b, : label_lens[b]].numpy().tolist(),
                meta["transcript"][b].numpy().decode(),
            )
    return got


def test_sample_data_round_trip(tmp_path):
    manifest = sample_data_subset(tmp_path, 20)
    out = tmp_path / "feats"
    info = run_job(FeatureJobConfig([manifest], str(out), shards=4), BEAM_ARGS)

    shards = [f"features-{i:05d}-of-00004.tfrecord" for i in range(4)]
    assert sorted(os.listdir(out)) == sorted([*shards, "dataset_info.json", "failures.jsonl"])
    assert sorted(os.listdir(tmp_path)) == ["feats", os.path.basename(manifest)]  # no staging
    assert (out / "failures.jsonl").read_text() == ""
    assert read_dataset_info(out)["shards"] == shards
    assert info["num_utterances"] == info["num_source_utterances"] == 20
    assert info["num_failed"] == 0 and info["failed_by_reason"] == {}
    assert info["featurizer"]["era"] == "current" and info["vocabulary_size"] == 29
    assert sum(info["length_histogram"]["counts"]) == 20
    counters = info["counters"]
    assert counters["utterances_read"] == counters["utterances_featurized"] == 20

    got = _read_back(out)
    utterances = load_utterances(manifest)
    assert sorted(got) == sorted(u.utt_id for u in utterances)
    tok, config, seconds = CharTokenizer(), FeaturizerConfig(), 0.0
    for utt in utterances:
        waveform = decode_audio(utt.audio_filepath)
        seconds += waveform.size / 16000
        features, labels, transcript = got[utt.utt_id]
        np.testing.assert_allclose(features, featurize(waveform, config), atol=1e-5)
        assert transcript == tok.normalize(utt.text).text and tok.decode(labels) == transcript
    assert info["hours"] == pytest.approx(seconds / 3600, rel=1e-6)
    assert info["total_frames"] == sum(f.shape[0] for f, _, _ in got.values())

    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        run_job(FeatureJobConfig([manifest], str(out)), BEAM_ARGS)

    # What the job wrote, the trainer reads (one schema module owns dataset_info.json).
    from qn_keras.training.data import from_tfrecords

    source = from_tfrecords(out)
    assert source.num_utterances == 20 and source.hours == pytest.approx(info["hours"])
    assert source.labels == list(tok.labels) and source.featurizer == config.to_dict()
    assert source.length_histogram == info["length_histogram"]
    source.check_compatible(tok, config)

    # The trainer featurizing the same manifest itself writes the same records (one
    # per-utterance chain, qn_keras.data.records, behind both).
    from qn_keras.training.data import featurize_manifest

    cached = featurize_manifest(manifest, tok, config, tmp_path / "cache")
    again = _read_back(cached.path)
    assert sorted(again) == sorted(got)
    for utt_id, (features, labels, transcript) in got.items():
        np.testing.assert_allclose(again[utt_id][0], features, rtol=0, atol=1e-6)
        assert again[utt_id][1:] == (labels, transcript)

    # A damaged info file is refused by name, not silently re-scanned or half-read.
    damaged = dict(info)
    del damaged["num_utterances"], damaged["hours"]
    (out / "dataset_info.json").write_text(json.dumps(damaged))
    with pytest.raises(ValueError, match=r"lacks \['num_utterances', 'hours'\]"):
        from_tfrecords(out)


def test_bad_inputs_through_cli(tmp_path, capsys):
    records, raw_lines, expected = bad_inputs(tmp_path / "bad")
    bad_manifest = write_manifest(tmp_path / "bad" / "manifest.json", records, raw_lines)
    good_manifest = sample_data_subset(tmp_path, 3, split="dev")
    out = tmp_path / "out"
    argv = ["features", "--manifest", good_manifest, "--manifest", bad_manifest]
    argv += ["--out", str(out), "--shards", "2", "--compression", "gzip"]
    argv += ["--oov", "reject", "--max-duration", "5", *BEAM_ARGS]
    assert qn_main(argv) == 0

    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    by_id = {}
    for f in failures:
        key = f["utt_id"] or f"line:{f['source'].rsplit(':', 1)[1]}"
        assert key not in by_id
        by_id[key] = f
        assert f["message"] and f["source"].startswith(str(tmp_path))
    rejected = {k: v for k, v in expected.items() if v is not None}
    assert {k: f["reason"] for k, f in by_id.items()} == rejected
    assert by_id["nan_float"]["source"] == f"{bad_manifest}:6"

    info = read_dataset_info(out)
    accepted = [k for k, v in expected.items() if v is None]
    good_ids = [u.utt_id for u in load_utterances(good_manifest)]
    assert info["num_utterances"] == len(accepted) + 3
    assert info["compression"] == "GZIP" and len(info["shards"]) == 2
    assert info["num_failed"] == len(rejected)
    assert sum(info["failed_by_reason"].values()) == len(rejected)
    assert info["pipeline"]["oov"] == "reject" and info["pipeline"]["max_duration"] == 5

    got = _read_back(out)
    assert sorted(got) == sorted(accepted + good_ids)
    resampled = featurize(decode_audio(str(tmp_path / "bad" / "rate_8k.wav")))
    np.testing.assert_allclose(got["rate_8k"][0], resampled, atol=1e-5)
    assert got["rate_8k"][0].shape[0] == 150  # 1.5 s at 16 kHz, 160-sample hop
    assert got["stereo_float"][2] == "stereo float"

    printed = capsys.readouterr().out
    assert f"wrote {len(accepted) + 3} utterances" in printed
    assert f"failed: {len(rejected)}" in printed and "unreadable_audio: 2" in printed


def test_interrupted_run_leaves_no_output(tmp_path, monkeypatch):
    paths = [write_wav(tmp_path / f"a{i}.wav", tone(0.5, seed=i)) for i in range(3)]
    manifest = write_manifest(
        tmp_path / "m.json", [{"audio_filepath": p, "text": "a"} for p in paths]
    )

    def explode(item):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(features_job, "to_tf_example", explode)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="worker lost"):
        run_job(FeatureJobConfig([manifest], str(out)), BEAM_ARGS)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["m.json", *[os.path.basename(p) for p in paths]])


def test_parts_featurized_apart_train_as_one_corpus(tmp_path):
    """`qn train --train A --train B`: feature folders made separately (and a manifest the
    trainer featurizes itself) read as one corpus; counts and histograms add up."""
    from qn_keras.streaming.prior import training_prior
    from qn_keras.training.data import open_data

    tok, config = CharTokenizer(), FeaturizerConfig()
    part_a = sample_data_subset(tmp_path, 5, split="train")
    part_b = sample_data_subset(tmp_path, 3, split="dev")
    run_job(FeatureJobConfig([part_a], str(tmp_path / "a"), shards=2), BEAM_ARGS)
    run_job(FeatureJobConfig([part_b], str(tmp_path / "b"), shards=1), BEAM_ARGS)
    extra = tmp_path / "c"
    extra.mkdir()
    part_c = sample_data_subset(extra, 2, split="dev")  # featurized by the trainer's cache
    parts = [tmp_path / "a", tmp_path / "b", part_c]
    whole = open_data(parts, tok, config, tmp_path / "cache")
    infos = [read_dataset_info(tmp_path / n) for n in "ab"]
    assert whole.num_utterances == 5 + 3 + 2 and len(whole.path) == 2 + 1 + 1
    assert whole.hours > sum(i["hours"] for i in infos)
    counts = whole.length_histogram["counts"]
    assert sum(counts) == 10
    assert all(c >= 0 for c in counts) and whole.featurizer == config.to_dict()
    ids = set()
    for *_, meta in whole.dataset(4, training=True, with_metadata=True):
        ids |= {u.decode() for u in meta["utt_id"].numpy()}
    expected = {u.utt_id for m in (part_a, part_b, part_c) for u in load_utterances(m)}
    assert ids == expected
    prior = training_prior([tmp_path / "a", tmp_path / "b"], _plain_featurizer(), limit=4)
    assert prior.utterances == 4

    run_job(FeatureJobConfig([part_b], str(tmp_path / "gz"), compression="gzip"), BEAM_ARGS)
    with pytest.raises(ValueError, match="mixes gzip-compressed and uncompressed"):
        open_data([tmp_path / "a", tmp_path / "gz"], tok, config, tmp_path / "cache")


def _plain_featurizer():
    from qn_keras.featurizer import LogMelSpectrogram

    return LogMelSpectrogram()
