"""Helpers shared by the manifest, reader and pipeline tests: small audio files of every kind
the feature job must accept or reject, made in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

# The project's own corpus, so that these tests run (and never skip) on any checkout.
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"


def tone(seconds: float, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A chirp plus a little noise: non-silent everywhere, so features are well defined."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)
    if channels == 1:
        return mono.astype(np.float32)
    return np.stack([mono * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)


def write_wav(path: Path, data: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> str:
    sf.write(str(path), data, rate, subtype=subtype)
    return str(path)


def write_manifest(path: Path, records: list, raw_lines: tuple = ()) -> str:
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def sample_data_subset(tmp_path: Path, count: int, split: str = "train") -> str:
    """The first `count` lines of a sample_data manifest, paths made absolute."""
    lines = (SAMPLE_DATA / f"{split}.json").read_text().splitlines()[:count]
    records = []
    for line in lines:
        record = json.loads(line)
        record["audio_filepath"] = str(SAMPLE_DATA / record["audio_filepath"])
        records.append(record)
    return write_manifest(tmp_path / f"{split}_{count}.json", records)


def bad_inputs(folder: Path) -> tuple[list, list, dict]:
    """A manifest's records (plus one malformed raw line) covering every kind of bad input,
    with good but unusual audio among them.

    Returns ``(records, raw_lines, expected)`` where ``expected`` maps each utterance id (or
    ``"line:N"`` for the malformed line) to the failure reason, or to None for inputs that
    must be written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty_file.wav").write_bytes(b"")
    rng = np.random.default_rng(1)
    (folder / "random_bytes.wav").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    write_wav(folder / "zero_samples.wav", np.zeros(0, np.float32))
    write_wav(folder / "rate_8k.wav", tone(1.5, rate=8000), rate=8000)
    write_wav(folder / "stereo_float.wav", tone(1.2, channels=2), subtype="FLOAT")
    nan = tone(1.0)
    nan[100] = np.nan
    write_wav(folder / "nan_float.wav", nan, subtype="FLOAT")
    write_wav(folder / "fifty_samples.wav", tone(1.0)[:50])
    write_wav(folder / "too_long.wav", tone(6.0))
    write_wav(folder / "oov_text.wav", tone(1.0, seed=2))
    write_wav(folder / "good_pcm24.wav", tone(1.0, seed=3), subtype="PCM_24")

    def rec(name, text="a test"):
        return {"audio_filepath": name, "text": text, "duration": 1.0}

    records = [
        rec("empty_file.wav"),
        rec("random_bytes.wav"),
        rec("zero_samples.wav"),
        rec("rate_8k.wav", "eight kilohertz"),
        rec("stereo_float.wav", "Stereo, float!"),
        rec("nan_float.wav"),
        rec("fifty_samples.wav"),
        rec("too_long.wav"),
        rec("oov_text.wav", "room 101"),
        rec("missing_file.wav"),
        rec("good_pcm24.wav", "twenty four bits"),
    ]
    raw_lines = ('{"audio_filepath": "broken.wav", "text": ',)
    expected = {
        "empty_file": "unreadable_audio",
        "random_bytes": "unreadable_audio",
        "zero_samples": "empty_audio",
        "rate_8k": None,
        "stereo_float": None,
        "nan_float": "non_finite",
        "fifty_samples": "too_short",
        "too_long": "too_long",
        "oov_text": "oov_transcript",
        "missing_file": "missing_file",
        "good_pcm24": None,
        f"line:{len(records) + 1}": "bad_manifest_line",
    }
    return records, list(raw_lines), expected
