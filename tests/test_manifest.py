"""Manifest readers: NeMo JSON lines, LibriSpeech folders, CSV/TSV; bad lines become failure
records (lenient) or ValueErrors naming file:line (strict); transcript OOV policy."""

import json
import os

import pytest

from qn_keras.data import (
    BAD_MANIFEST_LINE,
    ManifestFailure,
    TranscriptError,
    Utterance,
    load_utterances,
    read_utterances,
    tokenize_transcript,
)
from qn_keras.data.manifest import utterance_groups
from qn_keras.errors import UserInputError
from qn_keras.tokenizer import CharTokenizer


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _subdir(tmp_path):
    (tmp_path / "sub").mkdir()
    return tmp_path / "sub"


def test_nemo_manifest_paths_offsets_and_bad_lines(tmp_path):
    manifest = _write(
        _subdir(tmp_path) / "m.json",
        [
            json.dumps({"audio_filepath": "a/one.wav", "text": "Hello", "duration": 1.5}),
            json.dumps({"audio_filepath": "/abs/two.flac", "text": "x", "duration": 2}),
            "",
            json.dumps({"audio_filepath": "long.wav", "text": "s", "offset": 3.25, "duration": 2}),
            '{"audio_filepath": "cut.wav", "text": ',
            json.dumps({"text": "no path"}),
            json.dumps({"audio_filepath": "n.wav", "text": "t", "duration": "nan"}),
            json.dumps(["a", "list"]),
        ],
    )
    items = list(read_utterances(manifest))
    utts = [i for i in items if isinstance(i, Utterance)]
    fails = [i for i in items if isinstance(i, ManifestFailure)]
    assert [u.utt_id for u in utts] == ["one", "two", "long_00003250"]
    assert utts[0].audio_filepath == os.path.join(str(tmp_path), "sub", "a", "one.wav")
    assert utts[0].source == f"{manifest}:1" and utts[0].duration == 1.5
    assert utts[0].read_duration is None  # a whole file is read to its end
    assert utts[1].audio_filepath == "/abs/two.flac"
    assert utts[2].offset == 3.25 and utts[2].read_duration == 2.0 and utts[2].segment
    assert utts[2].source == f"{manifest}:4"
    assert [f.source for f in fails] == [f"{manifest}:{n}" for n in (5, 6, 7, 8)]
    assert all(f.reason == BAD_MANIFEST_LINE for f in fails)
    assert "audio_filepath" in fails[1].message and "duration" in fails[2].message


def test_strict_loader_names_file_and_line(tmp_path):
    good = json.dumps({"audio_filepath": "a.wav", "text": "a"})
    manifest = _write(tmp_path / "m.json", [good, good, "{not json"])
    with pytest.raises(ValueError, match=r"m\.json:3"):
        load_utterances(manifest)
    assert len(load_utterances(_write(tmp_path / "ok.json", [good, good]))) == 2
    with pytest.raises(FileNotFoundError, match="Manifest not found"):
        load_utterances(tmp_path / "absent.json")


def test_librispeech_folder(tmp_path):
    chapter = tmp_path / "19" / "198"
    chapter.mkdir(parents=True)
    _write(
        chapter / "19-198.trans.txt",
        ["19-198-0000 NORTHANGER ABBEY", "19-198-0001 THIS LITTLE WORK", "bad-line-without-text"],
    )
    items = list(read_utterances(tmp_path))
    utts = [i for i in items if isinstance(i, Utterance)]
    assert [(u.utt_id, u.text) for u in utts] == [
        ("19-198-0000", "NORTHANGER ABBEY"),
        ("19-198-0001", "THIS LITTLE WORK"),
    ]
    assert utts[0].audio_filepath == str(chapter / "19-198-0000.flac")
    assert isinstance(items[2], ManifestFailure) and items[2].source.endswith("trans.txt:3")


def test_utterance_groups_match_the_readers_ids(tmp_path):
    manifest = _write(
        tmp_path / "m.json",
        [
            json.dumps({"audio_filepath": "a/one.wav", "text": "x", "source": "espeak/en-us"}),
            json.dumps({"audio_filepath": "two.wav", "text": "x", "source": "flite/slt"}),
            json.dumps({"audio_filepath": "long.wav", "text": "x", "offset": 3.25, "duration": 1}),
            json.dumps({"audio_filepath": "x.wav", "utt_id": "mine", "source": 7, "text": "x"}),
            '{"audio_filepath": "cut.wav", "text": ',
            "",
            json.dumps({"text": "no path", "source": "s"}),
            # lines the reader rejects, whose ids would clash with good lines
            json.dumps({"audio_filepath": "b/one.wav", "text": 3, "source": "other"}),
            json.dumps({"audio_filepath": "two.wav", "duration": -1, "source": "other"}),
        ],
    )
    ids = [u.utt_id for u in read_utterances(manifest) if isinstance(u, Utterance)]
    groups = utterance_groups(manifest, "source")
    assert sorted(groups) == sorted(ids)  # every readable utterance, keyed as evaluation keys it
    assert groups == {
        "one": "espeak/en-us",
        "two": "flite/slt",
        "long_00003250": "(none)",
        "mine": "7",
    }
    clash = _write(
        tmp_path / "clash.json",
        [
            json.dumps({"audio_filepath": "voice_a/001.wav", "text": "x", "source": "a"}),
            json.dumps({"audio_filepath": "voice_b/001.wav", "text": "x", "source": "b"}),
        ],
    )
    with pytest.raises(UserInputError, match=r"clash\.json:2: utterance id '001'.*utt_id"):
        utterance_groups(clash, "source")
    chapter = tmp_path / "libri" / "19" / "198"
    chapter.mkdir(parents=True)
    _write(chapter / "19-198.trans.txt", ["19-198-0000 A", "19-198-0001 B"])
    assert utterance_groups(tmp_path / "libri", "speaker") == {
        "19-198-0000": "19",
        "19-198-0001": "19",
    }
    with pytest.raises(UserInputError, match="only be grouped by 'speaker'"):
        utterance_groups(tmp_path / "libri", "source")
    (tmp_path / "features").mkdir()
    with pytest.raises(UserInputError, match="the manifest it was made from"):
        utterance_groups(tmp_path / "features", "source")
    with pytest.raises(UserInputError, match="NeMo JSON-lines manifest or a LibriSpeech"):
        utterance_groups(_write(tmp_path / "m.csv", ["audio,text"]), "source")


def test_csv_and_tsv(tmp_path):
    csv_path = _write(
        tmp_path / "m.csv",
        [
            "path,transcript,duration",
            "clips/a.wav,hello there,1.0",
            '"b.wav","quoted, text",2',
            "c.wav",
        ],
    )
    items = list(read_utterances(csv_path))
    assert [(i.utt_id, i.text) for i in items[:2]] == [("a", "hello there"), ("b", "quoted, text")]
    assert items[0].audio_filepath == str(tmp_path / "clips" / "a.wav")
    assert isinstance(items[2], ManifestFailure) and items[2].source.endswith("m.csv:4")

    tsv_path = _write(tmp_path / "m.tsv", ["audio\tsentence", "x.wav\tsome words"])
    (utt,) = read_utterances(tsv_path)
    assert utt.text == "some words" and utt.audio_filepath == str(tmp_path / "x.wav")

    no_columns = _write(tmp_path / "bad.csv", ["foo,bar", "1,2"])
    (fail,) = read_utterances(no_columns)
    assert fail.reason == BAD_MANIFEST_LINE and "audio path" in fail.message


def test_oov_policy_keeps_punctuation_out_of_it():
    tok = CharTokenizer()
    text, ids, unknown = tokenize_transcript(tok, "Hello, World!", oov="reject")
    assert text == "hello world" and unknown == {} and tok.decode(ids) == text
    text, _, unknown = tokenize_transcript(tok, "Room 101", oov="drop")
    assert text == "room" and unknown == {"1": 2, "0": 1}
    with pytest.raises(TranscriptError, match="outside the vocabulary") as err:
        tokenize_transcript(tok, "Room 101", oov="reject")
    assert err.value.reason == "oov_transcript"
    with pytest.raises(ValueError, match="oov must be one of"):
        tokenize_transcript(tok, "x", oov="ignore")
