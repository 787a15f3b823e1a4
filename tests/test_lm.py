"""n-gram LMs (qn_keras.lm, `qn lm build/tune`): KenLM estimation from normalized text, the LM
folder's checks, beam search whose results a test can predict (an LM word beating an
acoustically likelier non-word, a hotword), exact frame skipping, timestamps, tuning."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_utils import run_qn

from qn_keras.errors import UserInputError
from qn_keras.lm import corpus
from qn_keras.lm.build import build_lm, check_prune
from qn_keras.lm.decoder import DecoderSettings, LMDecoder, _frames_that_matter
from qn_keras.lm.folder import LMFolderError, load_lm_folder
from qn_keras.lm.tune import best_row, parse_grid, tune_grid, write_results
from qn_keras.tokenizer import CharTokenizer

LABELS = CharTokenizer().labels
BLANK = len(LABELS)
REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "the cat sat on the mat",
    "the cat ate the fish",
    "a cat and a dog",
    "the dog sat on the cat",
    "my cat is on the mat",
]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    text = root / "text.txt"
    # Upper case, punctuation and digits: normalized like transcripts, the rest dropped.
    text.write_text("\n".join([s.capitalize() + "." for s in SENTENCES] * 20 + ["", "123"]))
    build_lm([text], root / "cats", order=3)
    return root / "cats"


def _logprobs(segments, blank_frames=1, floor=1e-4):
    """Log-probs with one frame per segment ({char: prob}), each followed by blank frames
    (p(blank) 0.98). The rest of each frame's mass is spread over the other classes."""
    rows = []
    for segment in segments:
        for probs in [segment] + [{"": 0.98}] * blank_frames:
            row = np.full(BLANK + 1, floor)
            for char, p in probs.items():
                row[BLANK if char == "" else LABELS.index(char)] = p
            rest = [i for i in range(BLANK + 1) if row[i] == floor]
            row[rest] = (1 - sum(probs.values())) / len(rest)
            rows.append(np.log(row))
    return np.asarray(rows, dtype=np.float32)


def _spell(text, confusions=None):
    """Segments spelling ``text`` with p 0.9 per character, except ``confusions``:
    {position: {char: p, ...}}."""
    confusions = confusions or {}
    return [confusions.get(i, {c: 0.9}) for i, c in enumerate(text)]


def _greedy(logprobs):
    from qn_keras.decoding import greedy_decode_ids

    return "".join(LABELS[i] for i in greedy_decode_ids(logprobs, len(logprobs), BLANK))


# Building ------------------------------------------------------------------------------------


def test_build_writes_a_kneser_ney_lm_from_normalized_text(lm_dir):
    meta = json.loads((lm_dir / "lm.json").read_text())
    assert meta["order"] == 3 and meta["labels"] == list(LABELS)
    text = meta["text"]
    assert text["lines"] == 102 and text["empty_lines"] == 2  # "" and "123"
    assert text["words"] == 20 * sum(len(s.split()) for s in SENTENCES)
    assert text["dropped_char_counts"] == {".": 100, "1": 1, "2": 1, "3": 1}
    unigrams = (lm_dir / "unigrams.txt").read_text().split("\n")
    assert unigrams[:2] == ["the", "cat"]  # most frequent first
    assert set(unigrams) == {w for s in SENTENCES for w in s.split()}
    # An independent check of the estimate: the ARPA file's unigram distribution sums to 1
    # (interpolated modified Kneser-Ney keeps it a distribution; <s> is never predicted).
    arpa = (lm_dir / "lm.arpa").read_text().split("\\1-grams:\n")[1].split("\n\n")[0]
    probs = {line.split("\t")[1]: 10 ** float(line.split("\t")[0]) for line in arpa.splitlines()}
    assert math.isclose(sum(p for w, p in probs.items() if w != "<s>"), 1.0, abs_tol=1e-3)
    # Kneser-Ney's unigrams follow continuation counts (distinct words before), not counts:
    # "the" (140 times; after <s>, on, ate) and "cat" (100; after the, a, my) tie, and so do
    # "fish" (20) and "mat" (40), both only ever after "the", below them.
    assert math.isclose(probs["the"], probs["cat"], rel_tol=1e-4)
    assert probs["cat"] > probs["fish"]
    assert math.isclose(probs["fish"], probs["mat"], rel_tol=1e-4)
    assert meta["ngrams"]["1"] == len(probs)
    folder = load_lm_folder(lm_dir)
    assert folder.lm_file.name == "lm.bin" and folder.labels == LABELS


def test_manifest_text_and_gzip(tmp_path):
    import gzip

    manifest = tmp_path / "train.json"
    manifest.write_text("".join(json.dumps({"audio_filepath": "x.wav", "text": s}) + "\n"
                                for s in SENTENCES))  # fmt: skip
    with gzip.open(tmp_path / "more.txt.gz", "wt") as f:
        f.write("Héllo wörld\n")
    stats = corpus.CorpusStats()
    lines = list(corpus.normalized_lines([manifest, tmp_path / "more.txt.gz"], CharTokenizer(),
                                         stats))  # fmt: skip
    assert lines == [*SENTENCES, "hello world"]  # accents folded as for transcripts
    assert stats.words == sum(len(s.split()) for s in SENTENCES) + 2


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "No words in the LM text"),
        (b"123 456\n...\n", "all empty after normalization"),
        (b"\xff\xfe\x00bad", "not UTF-8 text"),
    ],
)
def test_bad_text_is_one_line_and_writes_nothing(tmp_path, content, message):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    status, _, err = run_qn(["lm", "build", "--text", str(text), "--out", str(tmp_path / "lm")])
    assert status == 2 and message in err and str(text) in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_bad_manifest_line_names_the_line(tmp_path):
    manifest = tmp_path / "dev.json"
    manifest.write_text('{"text": "a cat"}\n{"text": \n')
    status, _, err = run_qn(["lm", "build", "--text", str(manifest), "--out", str(tmp_path / "x")])
    assert status == 2 and f"{manifest}:2" in err and not (tmp_path / "x").exists()


def test_order_and_prune_are_checked():
    assert check_prune([0, 1], 3) == [0, 0, 1]
    assert check_prune(None, 3) is None
    for prune, order in [([1, 0], 3), ([0, 1, 1], 3), ([-1], 2)]:
        with pytest.raises(UserInputError):
            check_prune(prune, order)
    with pytest.raises(UserInputError, match="--order"):
        build_lm(["x"], "/nonexistent/out", order=9)


def test_pruned_build_drops_rare_ngrams(tmp_path, lm_dir):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(SENTENCES * 3 + ["a rare sentence seen once"]))
    full = build_lm([text], tmp_path / "full", order=3)
    pruned = build_lm([text], tmp_path / "pruned", order=3, prune=[1, 1])
    assert pruned["ngrams"][1] == full["ngrams"][1]  # every word stays
    assert pruned["ngrams"][3] < full["ngrams"][3]


def _fake_lmplz(tmp_path, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("lmplz", "build_binary"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return bin_dir


def test_failed_estimator_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QN_KENLM_BIN", str(_fake_lmplz(tmp_path, "echo broken >&2; exit 3")))
    text = tmp_path / "t.txt"
    text.write_text("a cat\n")
    with pytest.raises(RuntimeError, match="lmplz failed .exit 3.: broken"):
        build_lm([text], tmp_path / "lm")
    assert not any(p.name.startswith((".lm", "lm")) for p in tmp_path.iterdir())


def test_killed_build_leaves_no_lm_folder(tmp_path):
    bin_dir = _fake_lmplz(tmp_path, "sleep 30")
    text = tmp_path / "t.txt"
    text.write_text("a cat\n")
    env = {**os.environ, "QN_KENLM_BIN": str(bin_dir)}
    command = [sys.executable, "-m", "qn_cli", "lm", "build", "--text", str(text),
               "--out", str(tmp_path / "lm")]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".lm.tmp-*/lmplz-*/corpus.txt")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "lm").exists()  # only a hidden temporary folder may remain


def test_missing_kenlm_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QN_KENLM_BIN", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    text = tmp_path / "t.txt"
    text.write_text("a cat\n")
    status, _, err = run_qn(["lm", "build", "--text", str(text), "--out", str(tmp_path / "lm")])
    assert status == 2 and "tools/build_kenlm.sh" in err and not (tmp_path / "lm").exists()


def test_cli_build_refuses_to_overwrite(tmp_path, lm_dir):
    text = tmp_path / "t.txt"
    text.write_text("a cat\n")
    out = tmp_path / "lm"
    assert run_qn(["lm", "build", "--text", str(text), "--out", str(out), "--order", "2"])[0] == 0
    status, _, err = run_qn(["lm", "build", "--text", str(text), "--out", str(out)])
    assert status == 2 and "--overwrite" in err
    status, stdout, _ = run_qn(["lm", "build", "--text", str(text), "--out", str(out),
                               "--overwrite", "--no-binary"])  # fmt: skip
    assert status == 0 and sorted(p.name for p in out.iterdir()) == [
        "lm.arpa", "lm.json", "unigrams.txt"]  # fmt: skip


# The LM folder's checks -----------------------------------------------------------------------


def _copy(lm_dir, tmp_path, drop=(), replace=None):
    out = tmp_path / "copy"
    out.mkdir()
    for path in lm_dir.iterdir():
        if path.name not in drop:
            (out / path.name).write_bytes(path.read_bytes())
    for name, data in (replace or {}).items():
        (out / name).write_bytes(data)
    return out


@pytest.mark.parametrize(
    "drop, replace, message",
    [
        (("unigrams.txt",), {}, "no unigrams.txt"),
        (("lm.bin", "lm.arpa"), {}, "no language model in the folder"),
        (("lm.arpa",), {"lm.bin": b"PK\x03\x04 a zip file"}, "not an ARPA or KenLM binary"),
        (("lm.bin",), {"lm.arpa": b""}, "not an ARPA or KenLM binary"),
        ((), {"unigrams.txt": b"cat\nna\xefve\n"}, "not UTF-8"),
        ((), {"decoder.json": b"{oops"}, "not valid JSON"),
        ((), {"decoder.json": b'{"alpha": "big"}'}, "alpha must be a number"),
    ],
)
def test_bad_lm_folders_are_named(lm_dir, tmp_path, drop, replace, message):
    folder = _copy(lm_dir, tmp_path, drop, replace)
    with pytest.raises(LMFolderError, match=message):
        load_lm_folder(folder)


def test_words_outside_the_labels_are_refused(lm_dir, tmp_path):
    folder = _copy(lm_dir, tmp_path)
    (folder / "unigrams.txt").write_text("cat\ncafé\nx1\n")
    with pytest.raises(LMFolderError, match=r"2 of 3 words .* 'café' \('é'\)"):
        LMDecoder(LABELS, folder)


def test_a_file_instead_of_a_folder(lm_dir, tmp_path):
    status, _, err = run_qn(["lm", "tune", "--model", "m", "--manifest", "d.json",
                            "--lm", str(lm_dir / "lm.bin")])  # fmt: skip
    assert status == 2 and "--lm takes an LM folder" in err


# Decoding --------------------------------------------------------------------------------------


def test_lm_word_beats_an_acoustically_likelier_non_word(lm_dir):
    # "the kat sat": the k is likelier than c on the acoustics alone.
    logprobs = _logprobs(_spell("the cat sat", {4: {"k": 0.55, "c": 0.4}}))
    assert _greedy(logprobs) == "the kat sat"
    decoder = LMDecoder(LABELS, lm_dir, DecoderSettings(alpha=0.5, beta=1.0))
    assert decoder.decode(logprobs).text == "the cat sat"
    # Without the LM the same beam search keeps the acoustics' choice.
    assert LMDecoder(LABELS, None).decode(logprobs).text == "the kat sat"


def test_hotword_wins_over_the_acoustics():
    logprobs = _logprobs(_spell("a bat", {2: {"b": 0.5, "p": 0.45}}))
    plain = LMDecoder(LABELS, None)
    assert plain.decode(logprobs).text == "a bat"
    boosted = LMDecoder(LABELS, None, DecoderSettings(hotwords=("pat",), hotword_weight=5.0))
    assert boosted.decode(logprobs).text == "a pat"
    with pytest.raises(UserInputError, match="outside the model's labels"):
        LMDecoder(LABELS, None, DecoderSettings(hotwords=("pät",)))


def test_word_frames_and_timestamps(lm_dir):
    # 2 blank frames after every character: character i is frame 3 i.
    logprobs = _logprobs(_spell("the cat sat"), blank_frames=2)
    decoded = LMDecoder(LABELS, lm_dir).decode(logprobs)
    assert decoded.word_frames == (("the", 0, 7), ("cat", 12, 19), ("sat", 24, 31))
    assert decoded.words(0.02)[1] == {"word": "cat", "start": 0.24, "end": 0.38}


def test_skipping_blank_runs_changes_nothing(lm_dir, monkeypatch):
    """Dropping the repeats of blank-only frames gives the same texts and word frames as the
    search over every frame (which the monkeypatched index function restores)."""
    import qn_keras.lm.decoder as decoder_module

    rng = np.random.default_rng(0)
    cases = []
    for _ in range(12):
        text = " ".join(rng.choice(["the", "cat", "sat", "mat", "dog", "xq"], size=4))
        confusions = {int(i): {text[int(i)]: 0.5, "e": 0.3} for i in rng.integers(0, 10, 3)}
        logprobs = _logprobs(_spell(text, confusions), blank_frames=int(rng.integers(1, 5)))
        cases.append(logprobs + rng.normal(0, 0.3, logprobs.shape).astype(np.float32))
    decoder = LMDecoder(LABELS, lm_dir, DecoderSettings(beam_width=8))
    skipping = [decoder.decode(lp) for lp in cases]
    assert sum(len(_frames_that_matter(lp, BLANK, -5.0)) for lp in cases) < sum(map(len, cases))
    monkeypatch.setattr(decoder_module, "_frames_that_matter", lambda lp, b, t: np.arange(len(lp)))
    every = [decoder.decode(lp) for lp in cases]
    assert [d.text for d in skipping] == [d.text for d in every]
    assert [d.word_frames for d in skipping] == [d.word_frames for d in every]


def test_decode_input_checks(lm_dir):
    decoder = LMDecoder(LABELS, lm_dir)
    assert decoder.decode(np.zeros((0, BLANK + 1))).text == ""
    with pytest.raises(UserInputError, match="expected \\[frames, 29\\]"):
        decoder.decode(np.zeros((5, 10)))
    bad = _logprobs(_spell("cat"))
    bad[1, 3] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        decoder.decode(bad)
    with pytest.raises(UserInputError, match="beam width"):
        DecoderSettings(beam_width=0)


# Tuning ----------------------------------------------------------------------------------------


def test_grid_parsing():
    assert parse_grid("0:1:0.25", "alpha") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_grid("0.5,2", "beta") == [0.5, 2.0]
    assert parse_grid("1", "beta") == [1.0]
    for bad in ("1:0:0.5", "0:1:0", "a:b:c", "", "0:1000:1"):
        with pytest.raises(UserInputError):
            parse_grid(bad, "alpha")


def test_tuning_in_parallel_finds_the_lm_and_writes_the_folder(lm_dir, tmp_path):
    folder = _copy(lm_dir, tmp_path)
    utterances = [
        ("the cat sat", {4: {"k": 0.55, "c": 0.4}}),
        ("a cat and a dog", {2: {"k": 0.55, "c": 0.4}}),
        ("the dog sat on the mat", {}),
    ]
    logprobs = [_logprobs(_spell(t, c)) for t, c in utterances]
    references = [t for t, _ in utterances]
    rows = tune_grid(logprobs, references, LABELS, folder, [0.0, 1.0], [0.0, 1.0], processes=2)
    assert len(rows) == 4
    by_cell = {(r["alpha"], r["beta"]): r for r in rows}
    assert by_cell[(1.0, 1.0)]["wer"] == 0.0
    assert by_cell[(0.0, 0.0)]["wer"] > 0.0  # without the LM the k's stay
    # The same numbers in one process (no pool).
    assert tune_grid(logprobs, references, LABELS, folder, [0.0, 1.0], [0.0, 1.0],
                     processes=1)[0]["wer"] == rows[0]["wer"]  # fmt: skip
    from qn_keras.lm.tune import TuneResult

    best = best_row(rows)
    result = TuneResult(rows, best, {"wer": 0.3, "cer": 0.1}, 3, 10.0)
    written = write_results(folder, result, DecoderSettings(beam_width=16), {"model": "m"})
    assert (folder / "tuning.csv").read_text().count("\n") == 5
    assert (folder / "tuning.png").read_bytes()[:4] == b"\x89PNG"
    assert written["alpha"] == best["alpha"] and written["beam_width"] == 16
    decoder = LMDecoder(LABELS, folder)  # the tuned setting is the default now
    assert decoder.settings.alpha == best["alpha"] and decoder.settings.beam_width == 16
    override = LMDecoder.from_folder(LABELS, folder, alpha=0.25, beta=None)
    assert override.settings.alpha == 0.25 and override.settings.beta == best["beta"]


def test_decoding_in_worker_processes_gives_the_same_results(lm_dir):
    from qn_keras.lm.decoder import ParallelLMDecoder

    cases = [_logprobs(_spell("the cat sat", {4: {"k": 0.55, "c": 0.4}})),
             _logprobs(_spell("a dog"), blank_frames=3)]  # fmt: skip
    local = LMDecoder(LABELS, lm_dir, DecoderSettings(alpha=0.5, beta=1.0))
    with ParallelLMDecoder(local, processes=2) as remote:
        futures = [remote.decode_async(lp) for lp in cases]
        assert [f.result() for f in futures] == [local.decode(lp) for lp in cases]
        with pytest.raises(UserInputError, match="do not fit"):
            remote.decode(np.zeros((3, 5)))
