"""Regenerates ``sample_data/``: the project's own small spoken-digit corpus.

The committed corpus is what ``make demo`` and the tests use; this script is only needed to
rebuild it, and only then needs the espeak-ng synthesizer (Debian/Ubuntu:
``apt-get install espeak-ng``; the corpus in git was made with espeak-ng 1.51).

Each utterance is 2 to 5 digits spoken as words ("three one four"). Digit strings are a domain
in which a small QuartzNet visibly learns within minutes on a laptop CPU: ten words, every
character of the alphabet that matters appears often, and utterances are short. Variety comes
from espeak-ng voices (accent) and variants (timbre), speaking rate, pitch, word gap and gain.
Training and held-out (dev) voices are disjoint, so the dev WER measures generalization to
unseen speakers rather than memorization; dev digit strings never occur in train either.

Everything is drawn from one seeded generator and espeak-ng is deterministic, so the same seed
and espeak-ng version give the same corpus.

Usage:
    python tools/make_sample_corpus.py [--out sample_data] [--seed 20240917]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qn_keras.audio import resample  # noqa: E402

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16000

# (espeak-ng voice, variant). Held-out variants (m2, m6, f3) never occur in training, so a dev
# speaker's timbre is new even where its accent was seen.
TRAIN_VOICES = (
    ("en-us", None),
    ("en-us", "m3"),
    ("en-us", "m7"),
    ("en-us", "f5"),
    ("en-gb", "f2"),
    ("en-gb", "m8"),
    ("en-gb-x-rp", "m1"),
    ("en-gb-x-rp", "f4"),
    ("en-gb-scotland", "m5"),
    ("en-029", "m4"),
    ("en-gb-x-gbclan", "f1"),
    ("en-gb-x-gbcwmd", "m3"),
)
DEV_VOICES = (
    ("en-gb-x-gbcwmd", "m2"),
    ("en-us", "f3"),
    ("en-gb", "m6"),
)
TRAIN_PER_VOICE = 21
DEV_PER_VOICE = 20

RATE_WPM = (145, 205)  # espeak-ng -s; its default is 175
PITCH = (30, 70)  # espeak-ng -p, 0..99; default 50
WORD_GAP = (0, 4)  # espeak-ng -g, extra pause between words in units of 10 ms
# Levels vary as real recordings do; staying well below full scale also keeps the FLAC files
# small (about 2.5 kB/s less per 6 dB), which is what fits ~300 utterances into ~6 MB.
PEAK_DBFS = (-30.0, -10.0)
PAD_S = 0.1  # silence kept on each side after trimming
SILENCE_DB = -40.0  # relative to the utterance's peak


def voice_name(voice: str, variant: str | None) -> str:
    return voice if variant is None else f"{voice}+{variant}"


def synthesize(text: str, voice: str, rate: int, pitch: int, gap: int) -> tuple[np.ndarray, int]:
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-g", str(gap)]
    proc = subprocess.run([*cmd, "--stdout", text], capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {err or 'no audio'}")
    audio, rate_hz = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return audio, rate_hz


def trim(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cuts leading/trailing silence (espeak-ng adds ~0.3 s at the end), keeping PAD_S."""
    frame = int(0.01 * sample_rate)
    n = len(audio) // frame
    energy = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(energy / energy.max()) > SILENCE_DB)[0]
    pad = int(PAD_S * sample_rate)
    start = max(loud[0] * frame - pad, 0)
    stop = min((loud[-1] + 1) * frame + pad, len(audio))
    return audio[start:stop]


def make_utterance(rng: random.Random, text: str, voice: str) -> np.ndarray:
    rate = rng.randint(*RATE_WPM)
    pitch = rng.randint(*PITCH)
    gap = rng.randint(*WORD_GAP)
    peak_db = rng.uniform(*PEAK_DBFS)
    audio, rate_hz = synthesize(text, voice, rate, pitch, gap)
    audio = resample(trim(audio, rate_hz), rate_hz, SAMPLE_RATE)
    audio = audio * (10 ** (peak_db / 20) / np.abs(audio).max())
    return audio.astype(np.float32)


def digit_string(rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 5)))


def write_split(out: Path, split: str, plan: list[tuple[str, str, str]], rng) -> list[dict]:
    (out / split).mkdir(parents=True)
    rows = []
    for index, (text, voice, speaker) in enumerate(plan):
        audio = make_utterance(rng, text, voice)
        rel = f"{split}/{speaker}-{index:04d}.flac"
        sf.write(out / rel, audio, SAMPLE_RATE, "PCM_16", format="FLAC", compression_level=1.0)
        duration = sf.info(out / rel).frames / SAMPLE_RATE
        rows.append(
            {
                "audio_filepath": rel,
                "duration": round(duration, 4),
                "text": text,
                "speaker": f"espeak-ng/{voice}",
            }
        )
    with open(out / f"{split}.json", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def plan_split(rng, voices, per_voice: int, exclude: set[str]) -> list[tuple[str, str, str]]:
    plan = []
    for voice, variant in voices:
        name = voice_name(voice, variant)
        speaker = name.replace("+", "_")
        for _ in range(per_voice):
            text = digit_string(rng)
            while text in exclude:
                text = digit_string(rng)
            plan.append((text, name, speaker))
    rng.shuffle(plan)
    return plan


def readme(train: list[dict], dev: list[dict], seed: int, version: str, size_mb: float) -> str:
    def minutes(rows):
        return sum(r["duration"] for r in rows) / 60

    def voices(rows):
        return ", ".join(sorted({r["speaker"].split("/", 1)[1] for r in rows}))

    return f"""# sample_data: the project's own spoken-digit corpus

Synthetic English speech of digit strings ("three one four one five", 2 to 5 digits, the words
zero to nine), made with the espeak-ng synthesizer by `tools/make_sample_corpus.py`. `make demo`
and the tests use it, so nothing needs a network or data from outside the repository. It is
small enough for a small QuartzNet to visibly learn it on two CPU cores within minutes.

| split | utterances | minutes | voices (espeak-ng voice+variant) |
|-------|-----------:|--------:|----------------------------------|
| train | {len(train)} | {minutes(train):.2f} | {voices(train)} |
| dev   | {len(dev)} | {minutes(dev):.2f} | {voices(dev)} |

- Audio: 16 kHz, mono, 16-bit FLAC; leading/trailing silence trimmed to {PAD_S} s.
- Drawn per utterance: speaking rate {RATE_WPM[0]}-{RATE_WPM[1]} words/min, pitch
  {PITCH[0]}-{PITCH[1]} (espeak-ng `-p`), extra word gap {WORD_GAP[0]}-{WORD_GAP[1] * 10} ms,
  peak level {PEAK_DBFS[0]:.0f} to {PEAK_DBFS[1]:.0f} dBFS.
- Size: {size_mb:.1f} MB of FLAC.
- Held-out voices: dev voices never occur in train (nor do their variants), and no dev digit
  string occurs in train, so dev WER measures generalization to unseen speakers.
- Manifests `train.json` and `dev.json` are NeMo JSON lines: `audio_filepath` (relative to the
  manifest's folder), `duration` (seconds), `text` (lowercase words), plus `speaker`.

## Regenerate

```
apt-get install espeak-ng        # only needed to regenerate; the corpus is committed
.venv/bin/python tools/make_sample_corpus.py --seed {seed}
```

Made with espeak-ng {version}, seed {seed}. The same seed and espeak-ng version give the same
corpus.

## License

Synthetic speech generated with espeak-ng. espeak-ng's license (GPL-3.0-or-later) covers the
synthesizer program, not the audio it produces; no recordings of people are involved. The
corpus is distributed under this repository's license.
"""


def espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True)
    # "eSpeak NG text-to-speech: 1.51  Data at: ..."
    return out.stdout.split(":", 1)[1].split()[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "sample_data")
    parser.add_argument("--seed", type=int, default=20240917)
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        sys.exit(
            "espeak-ng not found: install it (apt-get install espeak-ng) to regenerate the "
            "corpus. The committed sample_data/ does not need it."
        )

    rng = random.Random(args.seed)
    train_plan = plan_split(rng, TRAIN_VOICES, TRAIN_PER_VOICE, exclude=set())
    dev_plan = plan_split(rng, DEV_VOICES, DEV_PER_VOICE, exclude={t for t, _, _ in train_plan})

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and swapped in by rename, so an interrupted run never leaves a
    # half-written corpus in place.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the corpus folder's mode
    try:
        train = write_split(tmp, "train", train_plan, rng)
        dev = write_split(tmp, "dev", dev_plan, rng)
        size_mb = sum(p.stat().st_size for p in tmp.rglob("*.flac")) / 1e6
        (tmp / "README.md").write_text(readme(train, dev, args.seed, espeak_version(), size_mb))
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(r["duration"] for r in train + dev) / 60
    print(f"wrote {out}: {len(train)} train, {len(dev)} dev utterances, {total:.2f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
