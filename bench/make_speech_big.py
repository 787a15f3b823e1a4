#!/usr/bin/env python3
"""Makes speech-big: many more sentences in the voices speech-mini and speech-multi train on.

The accuracy issue's data lever. speech-mini train (800 sentences) and speech-multi (1,968)
cover few of the words the dev set uses (27.6% of dev word tokens are unseen), and the dev loss
flattens long before the train loss does. This asks the shared corpus tool for COUNT new
sentences past the ones those corpora used, spread over the same 56 training voices (no dev or
held-out voice), with the tool's per-utterance random rate and pitch.

Sentences are kept out when they are, or nearly are, an evaluation sentence: the tool's own
`--exclude-sentences` drops exact matches; fortune files also hold near-copies of one quote
(a changed word, a longer version), so every candidate that shares half or more of an
evaluation sentence's word 4-grams is written into an extra exclusion manifest first.

  python bench/make_speech_big.py --out runs/speech-big --count 12000

Needs ../shared/tools/install_tts_voices.sh to have run (as root). Writes OUT/train.json and
the LibriSpeech tree; OUT is a git-ignored folder (never commit generated audio).
"""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOOL = SHARED / "tools" / "make_speech_corpus.py"
TRAIN_MANIFESTS = [SHARED / "data/speech-mini/train.json", SHARED / "data/speech-multi/train.json"]
EVAL_MANIFESTS = [
    SHARED / "data/speech-mini/dev.json",
    SHARED / "data/asterisk-dev/dev.json",
    ROOT / "sample_data/dev.json",
    ROOT / "sample_data/test.json",
]
# speech-mini used sentence positions 0-919 and speech-multi 1000-2969 of the seed-0 list.
FIRST_SENTENCE = 3000


def load_tool():
    spec = importlib.util.spec_from_file_location("make_speech_corpus", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_texts(manifest):
    with open(manifest) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def grams(words, n=4):
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def near_copies(candidates, eval_texts, normalize):
    """Candidates sharing >= half of some evaluation sentence's word 4-grams."""
    index = {}
    for key, text in enumerate(eval_texts):
        g = grams(normalize(text).split())
        for gram in g:
            index.setdefault(gram, []).append((key, len(g)))
    out = []
    for sentence in candidates:
        hits = {}
        for gram in grams(sentence.split()):
            for key, size in index.get(gram, ()):
                hits[key] = (hits.get(key, (0, size))[0] + 1, size)
        if any(2 * count >= size for count, size in hits.values()):
            out.append(sentence)
    return out


def training_voices():
    voices = []
    for manifest in TRAIN_MANIFESTS:
        for line in open(manifest):
            source = json.loads(line)["source"]
            if source not in voices:
                voices.append(source)
    return voices


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=12000)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    tool = load_tool()
    eval_texts = [t for m in EVAL_MANIFESTS if m.exists() for t in read_texts(m)]
    candidates = tool.sentences(0)[FIRST_SENTENCE:]
    near = near_copies(candidates, eval_texts, tool.normalize)
    if len(candidates) - len(near) < a.count:
        sys.exit(
            f"only {len(candidates) - len(near)} sentences left after exclusions; ask for fewer"
        )
    a.out.mkdir(parents=True, exist_ok=True)
    exclusion = a.out / "excluded_near_copies.json"
    with open(exclusion, "w") as f:
        for sentence in near:
            f.write(json.dumps({"text": sentence}) + "\n")
    voices = training_voices()
    print(
        f"{len(candidates)} candidate sentences, {len(near)} near copies of evaluation sentences "
        f"left out; {a.count} utterances over {len(voices)} voices",
        flush=True,
    )
    cmd = [
        sys.executable,
        str(TOOL),
        "--out",
        str(a.out),
        "--seed",
        "0",
        "--split",
        f"train:{a.count}:{','.join(voices)}",
        "--skip-sentences",
        str(FIRST_SENTENCE),
        "--workers",
        str(a.workers),
        "--exclude-sentences",
        str(exclusion),
        *map(str, TRAIN_MANIFESTS),
        *map(str, (m for m in EVAL_MANIFESTS if m.exists())),
    ]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
