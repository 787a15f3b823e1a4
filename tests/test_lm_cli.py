"""--lm on `qn transcribe`, `qn evaluate` and `qn lm tune` end to end with a model folder: what
each command prints equals LMDecoder over the same log-probs, with the LM folder's tuned
settings by default and the flags' when given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import serving_utils as su
from cli_utils import run_qn

from qn_keras.lm.build import build_lm
from qn_keras.lm.decoder import DecoderSettings, LMDecoder
from qn_keras.tokenizer import CharTokenizer

LABELS = CharTokenizer().labels


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "sample-3"
    build_lm([su.REPO / "sample_data" / "train.json"], out, order=3)
    return out


@pytest.fixture(scope="module")
def dev_manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("dev") / "dev.json"
    path.write_text("".join(json.dumps(item) + "\n" for item in su.sample_items(6)))
    return path


def test_transcribe_with_lm_and_timestamps(lm_dir, dev_manifest, tmp_path):
    out, logprobs_dir = tmp_path / "out.jsonl", tmp_path / "lp"
    argv = ["transcribe", "--model", str(su.model_dir()), str(dev_manifest), "--lm",
            str(lm_dir), "--timestamps", "--output", str(out), "--logprobs-dir",
            str(logprobs_dir), "--no-progress"]  # fmt: skip
    status, stdout, _ = run_qn(argv)
    assert status == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    decoder = LMDecoder(LABELS, lm_dir)
    frame_seconds = 0.02  # 10 ms hop, stride 2
    for row in rows:
        decoded = decoder.decode(np.load(row["logprobs"]))
        assert row["pred_text"] == decoded.text
        assert row["words"] == decoded.words(frame_seconds)
    assert [line.split("\t")[1] for line in stdout.splitlines()] == [r["pred_text"] for r in rows]

    # Flags override the folder's settings.
    status, stdout, _ = run_qn([*argv[:6], "--alpha", "2.5", "--beta", "0", "--beam", "4",
                               "--no-progress"])  # fmt: skip
    assert status == 0
    strong = LMDecoder(LABELS, lm_dir, DecoderSettings(alpha=2.5, beta=0.0, beam_width=4))
    expected = [strong.decode(np.load(r["logprobs"])).text for r in rows]
    assert [line.split("\t")[1] for line in stdout.splitlines()] == expected


def test_lm_flags_without_lm_and_bad_lm_are_one_line_errors(dev_manifest, tmp_path):
    base = ["transcribe", "--model", str(su.model_dir()), str(dev_manifest), "--no-progress"]
    status, _, err = run_qn([*base, "--alpha", "1"])
    assert status == 2 and "--alpha need --lm DIR" in err
    (tmp_path / "empty").mkdir()
    status, _, err = run_qn([*base, "--lm", str(tmp_path / "empty")])
    assert status == 2 and "no language model in the folder" in err and err.count("\n") == 1


def test_evaluate_and_tune_with_lm(lm_dir, dev_manifest, tmp_path):
    from qn_keras.model_dir import load_model_dir
    from qn_keras.training.evaluation import evaluate, evaluation_dataset

    bundle = load_model_dir(su.model_dir())
    dataset, _ = evaluation_dataset(dev_manifest, bundle, 4)
    greedy = evaluate(bundle.model, dataset, bundle.tokenizer, keep_logprobs=True)

    # tune: the grid over the model's log-probs, the best setting into the LM folder.
    import shutil

    folder = tmp_path / "lm"
    shutil.copytree(lm_dir, folder)
    status, stdout, _ = run_qn(["lm", "tune", "--model", str(su.model_dir()), "--manifest",
                               str(dev_manifest), "--lm", str(folder), "--alpha", "0,1",
                               "--beta", "0:1:1", "--beam", "8", "--no-progress"])  # fmt: skip
    assert status == 0, stdout
    tuned = json.loads((folder / "decoder.json").read_text())
    assert tuned["beam_width"] == 8 and tuned["tuned_on"]["grid_cells"] == 4
    assert tuned["tuned_on"]["greedy_wer"] == pytest.approx(greedy.wer)
    assert (folder / "tuning.png").exists() and (folder / "tuning.csv").exists()

    # evaluate --lm uses the tuned setting: its hypotheses are LMDecoder's over the same
    # log-probs.
    out = tmp_path / "rows.jsonl"
    status, stdout, _ = run_qn(["evaluate", "--model", str(su.model_dir()), "--manifest",
                               str(dev_manifest), "--lm", str(folder), "--output", str(out),
                               "--batch-size", "4", "--no-progress"])  # fmt: skip
    assert status == 0
    rows = {r["utt_id"]: r["hypothesis"] for r in map(json.loads, out.read_text().splitlines())}
    decoder = LMDecoder(LABELS, folder)
    assert decoder.settings.beam_width == 8 and decoder.settings.alpha == tuned["alpha"]
    expected = {
        row["utt_id"]: decoder.decode(lp).text
        for row, lp in zip(greedy.utterances, greedy.logprobs, strict=True)
    }
    assert rows == expected
    assert f"WER: {100 * tuned['tuned_on']['wer']:.2f}%" in stdout


def test_tune_refuses_an_lm_the_model_cannot_spell(dev_manifest, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("é ü\n")
    build_lm([text], tmp_path / "accents", order=2, tokenizer=CharTokenizer(["é", "ü", " "]))
    status, _, err = run_qn(["lm", "tune", "--model", str(su.model_dir()), "--manifest",
                            str(dev_manifest), "--lm", str(tmp_path / "accents"),
                            "--no-progress"])  # fmt: skip
    assert status == 2 and "outside the model's labels" in err
    assert not Path(tmp_path / "accents" / "decoder.json").exists()


def test_long_files_in_chunks_decode_like_the_whole_file(lm_dir, tmp_path):
    """The chunked long-audio path hands its stitched log-probs (equal to the whole file's, as
    test_transcribe checks) to the LM search too."""
    import soundfile as sf

    from qn_keras.lm.decoder import ParallelLMDecoder
    from serving.recognizer import from_bundle
    from serving.transcribe import AudioItem, TranscribeOptions, Transcriber

    audio = np.concatenate(su.sample_waveforms()[:4])
    path = tmp_path / "long.wav"
    sf.write(path, audio, 16000)
    recognizer = from_bundle(su.tiny_bundle())
    options = TranscribeOptions(max_whole_seconds=1.0, chunk_seconds=2.0, context_seconds=1.0,
                                timestamps=True, keep_logprobs=True)  # fmt: skip
    with ParallelLMDecoder(LMDecoder(LABELS, lm_dir), processes=1) as decoder:
        (chunked,) = Transcriber(recognizer, options, decoder=decoder).transcribe([AudioItem(path)])
    expected = LMDecoder(LABELS, lm_dir).decode(chunked.logprobs)
    assert chunked.chunks > 1 and chunked.text == expected.text
    assert chunked.words == expected.words(recognizer.frame_seconds)
