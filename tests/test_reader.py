"""TFRecord schema round trip and the tf.data readers: element structure, padding, length
bucketing, deterministic order, compression, and on-the-fly featurization of manifests."""

import json
import logging

import numpy as np
import pytest
import tensorflow as tf
from pipeline_utils import tone, write_manifest, write_wav

from qn_keras.audio import decode_audio
from qn_keras.data import manifest_dataset, read_dataset_info, schema, tfrecord_dataset
from qn_keras.data.reader import boundaries_from_histogram
from qn_keras.featurizer import FeaturizerConfig, featurize
from qn_keras.tokenizer import CharTokenizer


def _record(i, frames, num_mels=64):
    rng = np.random.default_rng(i)
    features = rng.standard_normal((frames, num_mels)).astype(np.float32)
    labels = list(rng.integers(0, 28, size=1 + i % 7))
    return features, labels


def _write_shards(folder, lengths, shards=3, compression=None):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".tfrecord.gz" if compression else ".tfrecord"
    names = [f"features-{s:05d}-of-{shards:05d}{suffix}" for s in range(shards)]
    options = tf.io.TFRecordOptions(compression_type=compression or "")
    writers = [tf.io.TFRecordWriter(str(folder / n), options) for n in names]
    expected = {}
    for i, frames in enumerate(lengths):
        features, labels = _record(i, frames)
        utt_id = f"utt{i:03d}"
        text = CharTokenizer().decode(labels)
        writers[i % shards].write(
            schema.serialize_utterance(features, labels, text, frames / 100, utt_id, f"/a/{i}.wav")
        )
        expected[utt_id] = (features, labels)
    for w in writers:
        w.close()
    bins = np.bincount(np.asarray(lengths) // 50)
    info = {
        "shards": names,
        "compression": compression,
        "length_histogram": {"unit": "frames", "bin_width": 50, "counts": bins.tolist()},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return expected


def test_schema_round_trip():
    features, labels = _record(3, 17)
    blob = schema.serialize_utterance(features, labels, "some text", 0.17, "u1", "/x/u1.wav")
    parsed = schema.parse_example(tf.constant(blob))
    np.testing.assert_array_equal(parsed[schema.FEATURES].numpy(), features)
    assert parsed[schema.FEATURE_LENGTH].numpy() == 17
    assert parsed[schema.LABELS].numpy().tolist() == [int(x) for x in labels]
    assert parsed["label_length"].numpy() == len(labels)
    assert parsed[schema.TRANSCRIPT].numpy().decode() == "some text"
    assert parsed[schema.UTT_ID].numpy() == b"u1" and parsed[schema.SOURCE].numpy() == b"/x/u1.wav"
    assert parsed[schema.DURATION].numpy() == pytest.approx(0.17)
    as_numpy = schema.parse_example_numpy(blob)
    np.testing.assert_array_equal(as_numpy[schema.FEATURES], features)
    # The fast packed encoding is byte-identical to protobuf's own.
    slow = tf.train.FloatList(value=features.reshape(-1).tolist()).SerializeToString()
    assert schema._float_list(features.reshape(-1)).SerializeToString() == slow
    with pytest.raises(ValueError, match="frames, num_mels"):
        schema.serialize_utterance(features[0], labels, "", 0, "", "")


def test_tfrecord_dataset_structure_padding_and_values(tmp_path):
    lengths = [30, 75, 120, 40, 260, 55, 90, 310, 150, 33]
    expected = _write_shards(tmp_path / "ds", lengths)
    ds = tfrecord_dataset(
        tmp_path / "ds",
        4,
        shuffle=False,
        bucket_boundaries=None,
        with_metadata=True,
        label_pad_value=-1,
    )
    spec = ds.element_spec
    assert spec[0][0].shape.as_list() == [None, None, 64] and spec[0][0].dtype == tf.float32
    assert spec[0][1].dtype == tf.int32 and spec[1][0].dtype == tf.int32
    seen = 0
    for (feats, feat_lens), (labels, label_lens), meta in ds:
        assert feats.shape[1] == int(tf.reduce_max(feat_lens))
        for b in range(feats.shape[0]):
            ref_feats, ref_labels = expected[meta["utt_id"][b].numpy().decode()]
            n, u = int(feat_lens[b]), int(label_lens[b])
            np.testing.assert_array_equal(feats[b, :n].numpy(), ref_feats)
            assert not np.any(feats[b, n:].numpy())
            assert labels[b, :u].numpy().tolist() == [int(x) for x in ref_labels]
            assert np.all(labels[b, u:].numpy() == -1)
            seen += 1
    assert seen == len(lengths)


def test_bucketing_deterministic_order_and_gzip(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=64).tolist()
    _write_shards(tmp_path / "gz", lengths, shards=4, compression="GZIP")
    info = read_dataset_info(tmp_path / "gz")
    boundaries = boundaries_from_histogram(info["length_histogram"], num_buckets=4)
    assert boundaries == sorted(boundaries) and 2 <= len(boundaries) <= 3

    def ids(ds):
        return [u.decode() for *_, meta in ds for u in meta["utt_id"].numpy()]

    ds = tfrecord_dataset(
        tmp_path / "gz",
        8,
        seed=5,
        deterministic=True,
        with_metadata=True,
        bucket_boundaries=boundaries,
        shuffle_buffer=16,
    )
    first, second = ids(ds), ids(ds)
    assert sorted(first) == sorted(f"utt{i:03d}" for i in range(64))
    assert first != second  # each pass reshuffles...
    again = tfrecord_dataset(
        tmp_path / "gz",
        8,
        seed=5,
        deterministic=True,
        with_metadata=True,
        bucket_boundaries=boundaries,
        shuffle_buffer=16,
    )
    assert ids(again) == first  # ...in the same way on every run
    edges = [0, *boundaries, 10**9]
    for (_, feat_lens), _, _ in ds:
        lens = feat_lens.numpy()
        bucket = np.searchsorted(edges, lens, side="right")
        assert len(set(bucket.tolist())) == 1  # one bucket per batch

    dropped = tfrecord_dataset(
        tmp_path / "gz", 8, shuffle=False, bucket_boundaries=None, drop_remainder=True, repeat=True
    )
    for (feats, _), _ in dropped.take(12):  # more batches than one pass holds
        assert feats.shape[0] == 8
    auto = tfrecord_dataset(tmp_path / "gz", 8, shuffle=False)  # boundaries from the histogram
    assert sum(int(lens.shape[0]) for (_, lens), _ in auto) == 64


def test_incomplete_folder_is_an_error(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "features-00000-of-00001.tfrecord").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="interrupted"):
        tfrecord_dataset(tmp_path / "partial", 2)


def test_manifest_dataset_featurizes_like_featurize_and_skips_bad(tmp_path, caplog):
    paths = [write_wav(tmp_path / f"g{i}.wav", tone(0.5 + 0.3 * i, seed=i)) for i in range(4)]
    write_wav(tmp_path / "short.wav", tone(0.5)[:40])
    records = [
        {"audio_filepath": f"g{i}.wav", "text": f"Word {'x' * i}!", "duration": 0.5 + 0.3 * i}
        for i in range(4)
    ]
    records += [
        {"audio_filepath": "short.wav", "text": "short", "duration": 0.0},
        {"audio_filepath": "absent.wav", "text": "gone", "duration": 1.0},
        {"audio_filepath": "g0.wav", "text": "digits 42", "duration": 0.5},
    ]
    manifest = write_manifest(tmp_path / "m.json", records, ("not json",))
    config = FeaturizerConfig(era="legacy")
    ds = manifest_dataset(
        manifest,
        CharTokenizer(),
        config,
        3,
        oov="reject",
        deterministic=True,
        with_metadata=True,
        cache=False,
    )
    with caplog.at_level(logging.WARNING, logger="qn_keras.data.reader"):
        got = {}
        for (feats, feat_lens), (labels, label_lens), meta in ds:
            for b in range(feats.shape[0]):
                got[meta["utt_id"][b].numpy().decode()] = (
                    feats[b, : feat_lens[b]].numpy(),
                    CharTokenizer().decode(labels[b, : label_lens[b]].numpy().tolist()),
                )
    assert sorted(got) == ["g0", "g1", "g2", "g3"]
    for i, path in enumerate(paths):
        ref = featurize(decode_audio(path), config)
        np.testing.assert_allclose(got[f"g{i}"][0], ref, atol=1e-5)
        assert got[f"g{i}"][1] == ("word " + "x" * i).strip()
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 4 of 8" in message
    for reason in ("bad_manifest_line", "missing_file", "too_short", "oov_transcript"):
        assert reason in message


# Damaged records (written by another tool, or corrupted on disk) ----------------------------


def _raw_record(values, feature_length, num_mels, labels, utt_id):
    """A record in THE schema's layout whose fields need not agree with each other."""
    feature = {
        schema.FEATURES: tf.train.Feature(float_list=tf.train.FloatList(value=values)),
        schema.FEATURE_LENGTH: tf.train.Feature(
            int64_list=tf.train.Int64List(value=[feature_length])
        ),
        schema.NUM_MELS: tf.train.Feature(int64_list=tf.train.Int64List(value=[num_mels])),
        schema.LABELS: tf.train.Feature(int64_list=tf.train.Int64List(value=labels)),
        schema.UTT_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[utt_id.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


_GOOD = np.ones((6, 64), np.float32)
_NAN = _GOOD.copy()
_NAN[2, 5] = np.nan
_INF = _GOOD.copy()
_INF[0, 0] = -np.inf
DAMAGED = {
    "nan": (_raw_record(_NAN.ravel(), 6, 64, [1, 2], "bad"), "1 non-finite feature values"),
    "inf": (_raw_record(_INF.ravel(), 6, 64, [1, 2], "bad"), "1 non-finite feature values"),
    "length": (_raw_record(_GOOD.ravel(), 9, 64, [1, 2], "bad"), "feature_length 9 but 6 frames"),
    "no_frames": (_raw_record([], 0, 64, [1, 2], "bad"), "no feature frames"),
    "partial_frame": (
        _raw_record(_GOOD.ravel()[:-3], 6, 64, [1], "bad"),
        "381 feature values do not fill whole frames of 64",
    ),
    "num_mels": (_raw_record(np.ones(6 * 80), 6, 80, [1], "bad"), "num_mels 80 where 64"),
    "label_id": (_raw_record(_GOOD.ravel(), 6, 64, [1, 28], "bad"), "label id 28 outside"),
    "negative_label": (_raw_record(_GOOD.ravel(), 6, 64, [-1], "bad"), "negative label id"),
}


def _shard_with(tmp_path, damaged: bytes):
    path = tmp_path / "shard.tfrecord"
    good = [schema.serialize_utterance(*_record(i, 10), "t", 0.1, f"ok{i}", "") for i in range(5)]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in good[:3] + [damaged] + good[3:]:
            writer.write(record)
    return path


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_record_is_named_before_its_batch(case, tmp_path):
    """Batches before the bad record come out; its batch raises, naming it, its file and the
    problem (never a batch built from it)."""
    from qn_keras.data import CorruptRecordError
    from qn_keras.data.reader import raise_corrupt_record

    record, problem = DAMAGED[case]
    path = _shard_with(tmp_path, record)
    ds = tfrecord_dataset(
        str(path), 2, shuffle=False, bucket_boundaries=None, deterministic=True, num_labels=28
    )
    delivered = []
    with pytest.raises(CorruptRecordError) as info:
        try:
            for batch in ds:
                delivered.append(batch[0][1].numpy().tolist())
        except tf.errors.InvalidArgumentError as e:
            raise_corrupt_record(e)
    assert delivered == [[10, 10]]  # the first batch; the second holds the bad record
    assert f"utterance 'bad' in {path}: {problem}" in str(info.value)


def test_damaged_records_kept_for_reporting(tmp_path):
    """bad_records='keep' hands out a one-frame stand-in with its problem in the metadata, and
    leaves the good records of its batch untouched."""
    path = _shard_with(tmp_path, DAMAGED["nan"][0])
    ds = tfrecord_dataset(
        str(path),
        8,
        shuffle=False,
        bucket_boundaries=None,
        deterministic=True,
        num_labels=28,
        with_metadata=True,
        bad_records="keep",
    )
    (features, lengths), (_, label_lengths), meta = next(iter(ds))
    problems = [p.decode() for p in meta["problem"].numpy()]
    assert [bool(p) for p in problems] == [False, False, False, True, False, False]
    assert lengths.numpy()[3] == 1 and label_lengths.numpy()[3] == 1
    assert np.all(np.isfinite(features.numpy()))
    np.testing.assert_array_equal(features[0, :10].numpy(), _record(0, 10)[0])


def test_manifest_audio_with_non_finite_features_is_named(tmp_path):
    """Finite audio far beyond full scale overflows the power spectrum: the featurized
    utterance is refused by name, not transcribed or trained on."""
    import soundfile as sf

    from qn_keras.data import CorruptRecordError
    from qn_keras.data.reader import raise_corrupt_record

    loud = tmp_path / "loud.wav"
    sf.write(str(loud), (tone(1.0) * 1e30).astype(np.float32), 16000, subtype="FLOAT")
    manifest = write_manifest(
        tmp_path / "m.json", [{"audio_filepath": str(loud), "duration": 1.0, "text": "a"}]
    )
    ds = manifest_dataset(
        str(manifest),
        CharTokenizer(),
        None,
        1,
        shuffle=False,
        bucket_boundaries=None,
        deterministic=True,
        cache=False,
    )
    with pytest.raises(CorruptRecordError, match=r"in .*loud\.wav: \d+ non-finite feature"):
        try:
            list(ds)
        except tf.errors.InvalidArgumentError as e:
            raise_corrupt_record(e)
