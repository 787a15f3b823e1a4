"""The committed sample corpus (sample_data/) is complete, consistent and as documented."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent / "sample_data"
DIGITS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
EXPECTED_COUNTS = {"train": 252, "dev": 60}


def _manifest(split):
    with open(ROOT / f"{split}.json") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def manifests():
    return {split: _manifest(split) for split in ("train", "dev")}


def test_counts_match_expected_and_readme(manifests):
    readme = (ROOT / "README.md").read_text()
    for split, rows in manifests.items():
        assert len(rows) == EXPECTED_COUNTS[split]
        row = re.search(rf"^\| {split}\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|", readme, re.M)
        assert row, f"README has no table row for {split}"
        assert int(row.group(1)) == len(rows)
        minutes = sum(r["duration"] for r in rows) / 60
        assert float(row.group(2)) == pytest.approx(minutes, abs=0.01)


def test_manifest_fields_and_texts(manifests):
    for rows in manifests.values():
        for r in rows:
            assert set(r) == {"audio_filepath", "duration", "text", "speaker"}
            assert not Path(r["audio_filepath"]).is_absolute()
            words = r["text"].split(" ")
            assert 2 <= len(words) <= 5, r
            assert set(words) <= DIGITS, r
            assert r["duration"] == round(r["duration"], 4)


def test_audio_files_match_manifests(manifests):
    for split, rows in manifests.items():
        listed = {r["audio_filepath"] for r in rows}
        on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / split).iterdir()}
        assert listed == on_disk, "manifest and folder disagree"
        for r in rows:
            path = ROOT / r["audio_filepath"]
            info = sf.info(path)
            assert (info.format, info.subtype) == ("FLAC", "PCM_16"), path
            assert (info.samplerate, info.channels) == (16000, 1), path
            assert abs(info.frames / 16000 - r["duration"]) <= 0.01, path
            audio, _ = sf.read(path, dtype="float32")
            peak = np.abs(audio).max()
            # Peak levels are drawn from -30..-10 dBFS: silent or clipped files are a bug.
            assert 10 ** (-31 / 20) < peak < 10 ** (-9 / 20), (path, peak)
            # Trimmed: at most ~0.1 s of silence (below -60 dB re peak) at either edge.
            sound = np.nonzero(np.abs(audio) > peak * 1e-3)[0]
            assert sound[0] / 16000 < 0.15 and (len(audio) - sound[-1]) / 16000 < 0.15, path


def test_train_and_dev_are_disjoint(manifests):
    train_voices = {r["speaker"] for r in manifests["train"]}
    dev_voices = {r["speaker"] for r in manifests["dev"]}
    assert len(train_voices) == 12 and len(dev_voices) == 3
    assert not train_voices & dev_voices

    def variants(voices):
        return {v.partition("+")[2] for v in voices}

    # Held-out timbres: no dev voice variant is used in training.
    assert not variants(train_voices) & variants(dev_voices)
    assert not {r["text"] for r in manifests["train"]} & {r["text"] for r in manifests["dev"]}


def test_every_digit_is_well_represented(manifests):
    for rows in manifests.values():
        counts = {d: 0 for d in DIGITS}
        for r in rows:
            for w in r["text"].split():
                counts[w] += 1
        assert min(counts.values()) >= 10, counts
