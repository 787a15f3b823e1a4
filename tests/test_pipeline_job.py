"""The feature job end to end: the project's sample corpus through the job and back through the reader, every
kind of bad input through `qn features`, and what an interrupted run leaves behind."""

import json
import os

import numpy as np
import pytest
from pipeline_utils import (
    SAMPLE_DATA,
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


def test_parts_featurized_apart_train_as_one_corpus(tmp_path, monkeypatch):
    """`qn train --train A --train B`: feature folders made separately (and a manifest the
    trainer featurizes itself) read as one corpus; counts and histograms add up."""
    import collections

    import qn_keras.streaming.prior as prior_module
    from qn_keras.data import reader
    from qn_keras.data.dataset_info import length_histogram
    from qn_keras.streaming.prior import training_prior
    from qn_keras.training.data import open_data

    tok, config = CharTokenizer(), FeaturizerConfig()
    lines = (SAMPLE_DATA / "train.json").read_text().splitlines()
    parts = []
    for name, chunk in (("a", lines[0:5]), ("b", lines[5:8]), ("c", lines[8:10])):
        records = [json.loads(line) for line in chunk]
        for r in records:
            r["audio_filepath"] = str(SAMPLE_DATA / r["audio_filepath"])
        parts.append(write_manifest(tmp_path / f"{name}.json", records))
    # a: 5 utterances in 8 shards (some empty); b: 3 in 1; c: a manifest
    run_job(FeatureJobConfig([parts[0]], str(tmp_path / "a"), shards=8), BEAM_ARGS)
    run_job(FeatureJobConfig([parts[1]], str(tmp_path / "b"), shards=1), BEAM_ARGS)
    whole = open_data([tmp_path / "a", tmp_path / "b", parts[2]], tok, config, tmp_path / "cache")

    utterances = [u for m in parts for u in load_utterances(m)]
    frames = {u.utt_id: len(featurize(decode_audio(u.audio_filepath), config)) for u in utterances}
    seconds = sum(decode_audio(u.audio_filepath).size / 16000 for u in utterances)
    assert whole.num_utterances == 10 and len(whole.path) == 8 + 1 + 1
    assert whole.hours == pytest.approx(seconds / 3600, rel=1e-6)
    assert whole.length_histogram == length_histogram(list(frames.values()))
    assert whole.featurizer == config.to_dict() and whole.labels == list(tok.labels)
    seen = collections.Counter()
    for (_, lengths), _, meta in whole.dataset(4, training=True, with_metadata=True):
        for utt_id, n in zip(meta["utt_id"].numpy(), lengths.numpy(), strict=True):
            seen[utt_id.decode()] += 1
            assert n == frames[utt_id.decode()]
    assert seen == collections.Counter(list(frames))  # each utterance of each part once
    # A list of files without dataset info takes the feature width from the first record,
    # which an empty first shard does not hold.
    empty = tmp_path / "empty.tfrecord"
    empty.write_bytes(b"")
    spec = reader.tfrecord_dataset([str(empty), *whole.path], 4).element_spec
    assert spec[0][0].shape.as_list() == [None, None, config.num_mels]

    prior_sources = []
    real = prior_module.prior_from_audio

    def recording(paths, *args, **kwargs):
        prior_sources.extend(paths := list(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(prior_module, "prior_from_audio", recording)
    prior = training_prior([tmp_path / "a", tmp_path / "b"], _plain_featurizer(), limit=4)
    by_part = {
        u.audio_filepath: name
        for name, m in zip("abc", parts, strict=True)
        for u in load_utterances(m)
    }
    assert {by_part[str(s)] for s in prior_sources} == {"a", "b"}  # both parts, in turn
    assert prior.utterances == 4

    run_job(FeatureJobConfig([parts[1]], str(tmp_path / "gz"), compression="gzip"), BEAM_ARGS)
    with pytest.raises(ValueError, match="mixes gzip-compressed and uncompressed"):
        open_data([tmp_path / "a", tmp_path / "gz"], tok, config, tmp_path / "cache")


def _plain_featurizer():
    from qn_keras.featurizer import LogMelSpectrogram

    return LogMelSpectrogram()
