"""Each stage of the feature job on small in-memory inputs (TestPipeline + assert_that)."""

import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to, is_not_empty
from pipeline_utils import tone, write_manifest, write_wav

from pipeline.features_job import FeatureJobConfig, make_pipeline, parse_narrowband, parse_rates
from pipeline.stats import CountByReasonFn, DatasetStatsFn
from pipeline.transforms import (
    FAILED,
    DecodeAndFeaturizeFn,
    Decoded,
    FeaturizeUtterances,
    ReadManifests,
    SplitFailures,
    TokenizeFn,
    Transcribed,
    band_limit,
    decode_utterance,
    narrowband_copies,
    speed_perturbed_copies,
    to_tf_example,
)
from qn_keras.data import Utterance, schema
from qn_keras.data.manifest import Failure
from qn_keras.featurizer import FeaturizerConfig, featurize
from qn_keras.tokenizer import ENGLISH_LABELS, CharTokenizer

RUNNER = "FnApiRunner"  # DirectRunner would first try to download the Prism runner.


def _pipeline():
    return BeamTestPipeline(runner=RUNNER)


def _utt(utt_id, path="/nowhere.wav", text="hello"):
    return Utterance(utt_id, path, text, source=f"m.json:{utt_id}")


def test_read_manifests_splits_good_and_bad_lines(tmp_path):
    m1 = write_manifest(
        tmp_path / "a.json",
        [{"audio_filepath": "x.wav", "text": "one"}, {"audio_filepath": "/y.wav", "text": "two"}],
        ('{"broken": ',),
    )
    m2 = write_manifest(tmp_path / "b.json", [{"audio_filepath": "z.wav", "text": "three"}])
    chapter = tmp_path / "libri" / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 HELLO THERE\n")
    tsv = tmp_path / "c.tsv"
    tsv.write_text("path\ttranscript\nclips/t.wav\tfour\n")
    with _pipeline() as p:
        read = p | ReadManifests([m1, m2, str(tmp_path / "libri"), str(tsv)])
        ids = read["utterances"] | "Ids" >> beam.Map(lambda u: (u.utt_id, u.audio_filepath))
        expected = [("x", str(tmp_path / "x.wav")), ("y", "/y.wav"), ("z", str(tmp_path / "z.wav"))]
        expected += [("19-198-0000", str(chapter / "19-198-0000.flac"))]
        expected += [("t", str(tmp_path / "clips" / "t.wav"))]
        assert_that(ids, equal_to(expected))
        bad = read[FAILED] | "Bad" >> beam.Map(lambda f: (f.source, f.reason))
        assert_that(bad, equal_to([(f"{m1}:3", "bad_manifest_line")]), label="CheckBad")


def test_tokenize_and_dataset_stats():
    tok = CharTokenizer()
    utts = [_utt("a", text="Hello, World"), _utt("b", text="Room 7")]
    with _pipeline() as p:
        for oov in ("drop", "reject"):
            out = (
                p
                | f"Utts{oov}" >> beam.Create(utts)
                | f"Tokenize{oov}" >> beam.ParDo(TokenizeFn(ENGLISH_LABELS, oov))
                | f"Split{oov}" >> SplitFailures()
            )
            texts = out["ok"] | f"Texts{oov}" >> beam.Map(
                lambda t: (t.utt.utt_id, t.text, t.labels)
            )
            expected = [("a", "hello world", tuple(tok.encode("hello world")))]
            if oov == "drop":
                expected.append(("b", "room", tuple(tok.encode("room"))))
            assert_that(texts, equal_to(expected), label=f"CheckTexts{oov}")
            reasons = out[FAILED] | f"Reasons{oov}" >> beam.Map(lambda f: (f.utt_id, f.reason))
            assert_that(
                reasons,
                equal_to([("b", "oov_transcript")] if oov == "reject" else []),
                label=f"CheckOov{oov}",
            )

        stats = (
            p
            | "Items" >> beam.Create([(120, 1.2, True), (40, 0.4, True), (133, 1.33, False)])
            | beam.CombineGlobally(DatasetStatsFn())
        )

        def check(s):
            assert s["num_utterances"] == 3 and s["num_source_utterances"] == 2
            assert s["hours"] == pytest.approx(2.93 / 3600)
            assert s["source_hours"] == pytest.approx(1.6 / 3600)
            assert (s["min_frames"], s["max_frames"], s["total_frames"]) == (40, 133, 293)
            assert s["length_histogram"]["counts"] == [1, 0, 2]
            return True

        assert_that(stats | beam.Map(check), equal_to([True]))
        empty = (
            p | "None" >> beam.Create([]) | "EmptyStats" >> beam.CombineGlobally(DatasetStatsFn())
        )
        assert_that(
            empty | "N" >> beam.Map(lambda s: s["num_utterances"]),
            equal_to([0]),
            label="CheckEmpty",
        )
        counts = (
            p
            | "Failures" >> beam.Create([Failure("s", "m", r) for r in "bab"])
            | "Count" >> beam.CombineGlobally(CountByReasonFn())
            | "Json" >> beam.Map(json.dumps)
        )
        assert_that(counts, equal_to(['{"a": 1, "b": 2}']), label="CheckCounts")
        assert_that(counts, is_not_empty(), label="NotEmpty")


def test_decode_and_speed_perturb_steps(tmp_path):
    good = write_wav(tmp_path / "g8k.wav", tone(1.0, rate=8000), rate=8000)
    long = write_wav(tmp_path / "long.wav", tone(3.0))
    decoded = decode_utterance(Transcribed(_utt("g8k", good), "a", (1,)), 16000, 320, 2.0)
    assert decoded.num_samples == 16000  # 8 kHz resampled to 16 kHz
    too_long = decode_utterance(Transcribed(_utt("long", long), "a", (1,)), 16000, 320, 2.0)
    assert too_long.reason == "too_long" and too_long.utt_id == "long"
    gone = decode_utterance(Transcribed(_utt("gone", str(tmp_path / "x.wav")), "a", ()), 16000, 320)
    assert gone.reason == "missing_file" and "x.wav" in gone.message

    item = Decoded("u", _utt("u"), "a", (1,), tone(1.0))
    copies = speed_perturbed_copies(item, [0.9, 1.0, 1.1], 16000, 320)
    # Speed r resamples from r*16 kHz to 16 kHz: ceil(n / r) samples.
    assert [(c.utt_id, c.num_samples, c.speed) for c in copies] == [
        ("u", 16000, 1.0),
        ("u_sp0.9", 17778, 0.9),
        ("u_sp1.1", 14546, 1.1),
    ]
    tiny = Decoded("t", _utt("t"), "a", (1,), tone(1.0)[:330])
    kept, short = speed_perturbed_copies(tiny, [1.1], 16000, 320)
    assert kept is tiny and (short.utt_id, short.reason) == ("t_sp1.1", "too_short")


def test_narrowband_copies_remove_the_top_band():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(16000).astype(np.float32) * 0.1  # white: energy up to 8 kHz
    narrow = band_limit(noise, 8000, 16000)
    assert narrow.shape == noise.shape and narrow.dtype == np.float32
    power = np.abs(np.fft.rfft(narrow)) ** 2
    freqs = np.fft.rfftfreq(narrow.shape[0], 1 / 16000)
    # Independent check: nothing above 4 kHz (bar the filter's transition band), the band
    # below it kept.
    assert power[freqs > 4000].sum() < 1e-4 * power.sum()
    full = np.abs(np.fft.rfft(noise)) ** 2
    assert power[freqs < 3500].sum() == pytest.approx(full[freqs < 3500].sum(), rel=0.02)

    item = Decoded("u", _utt("u"), "a", (1,), noise)
    copies = speed_perturbed_copies(item, [1.1], 16000, 320)
    failed = Failure("s", "m", "too_short", utt_id="x")
    out = narrowband_copies([*copies, failed], [8000], 16000)
    assert [c.utt_id for c in out] == [
        "u",
        "u_sp1.1",
        "x",
        "u_nb8000",
        "u_sp1.1_nb8000",
    ]
    assert [c.is_source for c in out if not isinstance(c, Failure)] == [True, False, False, False]
    assert out[4].speed == 1.1 and out[4].narrowband == 8000
    assert out[4].num_samples == out[1].num_samples


def test_decode_and_featurize_batches_and_composite(tmp_path):
    config = FeaturizerConfig(era="current")
    waves = {f"u{i}": tone(0.4 + 0.2 * i, seed=i) for i in range(3)}
    paths = {k: write_wav(tmp_path / f"{k}.wav", w, subtype="FLOAT") for k, w in waves.items()}
    batch = [Transcribed(_utt(k, paths[k]), "hi", (8, 9)) for k in waves]
    batch.append(Transcribed(_utt("gone", str(tmp_path / "gone.wav")), "hi", (8, 9)))
    utts = [_utt("g", paths["u2"], "Good one"), _utt("bad", str(tmp_path / "x.wav"))]
    legacy = FeaturizerConfig(era="legacy")

    def check(blob):
        record = schema.parse_example_numpy(blob)
        ref = featurize(waves[record["utt_id"]], config)
        np.testing.assert_allclose(record["features"], ref, atol=1e-5)
        assert record["labels"] == [8, 9] and record["transcript"] == "hi"
        return record["utt_id"], record["feature_length"], round(record["duration"], 3)

    with _pipeline() as p:
        out = (
            p
            | "Batches" >> beam.Create([batch[:2], batch[2:]])
            | "Featurize" >> beam.ParDo(DecodeAndFeaturizeFn(config.to_dict(), threads=2))
            | "Split" >> SplitFailures()
        )
        checked = out["ok"] | "Serialize" >> beam.Map(to_tf_example) | "Check" >> beam.Map(check)
        assert_that(
            checked, equal_to([("u0", 40, 0.4), ("u1", 60, 0.6), ("u2", 80, 0.8)]), label="Feats"
        )
        failed = out[FAILED] | "Failed" >> beam.Map(lambda f: (f.utt_id, f.reason))
        assert_that(failed, equal_to([("gone", "missing_file")]), label="Failures")

        composite = (
            p
            | "Utterances" >> beam.Create(utts)
            | FeaturizeUtterances(
                legacy.to_dict(), ENGLISH_LABELS, speed_perturb=(1.1,), narrowband=(8000,)
            )
        )
        frames = composite["featurized"] | "Frames" >> beam.Map(
            lambda f: (f.utt_id, f.num_frames, f.text)
        )
        # legacy era: L // 160 + 1 frames; 0.8 s = 12800 samples, at speed 1.1: 11637
        assert_that(
            frames,
            equal_to(
                [
                    ("g", 81, "good one"),
                    ("g_sp1.1", 73, "good one"),
                    ("g_nb8000", 81, "good one"),
                    ("g_sp1.1_nb8000", 73, "good one"),
                ]
            ),
            label="Comp",
        )
        assert_that(
            composite[FAILED] | "R" >> beam.Map(lambda f: f.reason),
            equal_to(["missing_file"]),
            label="CompFailures",
        )


def test_job_config_validation():
    assert parse_rates("0.9, 1.1") == (0.9, 1.1)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_rates("fast")
    with pytest.raises(ValueError, match="era must be one of"):
        FeatureJobConfig(["m.json"], "out", era="future")
    with pytest.raises(ValueError, match="speed perturbation"):
        FeatureJobConfig(["m.json"], "out", speed_perturb=(3.0,))
    assert parse_narrowband("8000") == (8000,)
    with pytest.raises(ValueError, match="sample rates in Hz"):
        parse_narrowband("8k")
    with pytest.raises(ValueError, match="must lie in"):
        FeatureJobConfig(["m.json"], "out", narrowband=(16000,))
    with pytest.raises(ValueError, match="At least one manifest"):
        FeatureJobConfig([], "out")
    # Beam 2.77's multi-threaded local runner was seen dropping records before the shards.
    with pytest.raises(ValueError, match="multi_processing"):
        make_pipeline(PipelineOptions(["--direct_running_mode=multi_threading"]))
    assert make_pipeline(PipelineOptions([])).options.view_as(StandardOptions).runner == RUNNER
