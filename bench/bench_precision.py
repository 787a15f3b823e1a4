"""float32 against bfloat16 serving (`qn export --precision bfloat16`): accuracy and speed.

For each model folder and manifest: greedy WER/CER of the `serving_default` graph in float32
and in bfloat16, the largest log-probability difference on valid frames, and how often the
per-frame argmax differs. Then the speed of both on a 20 s clip and 8 x 5 s clips of real
speech (the presets' random-weight 5x5 and 15x5 unless --speed-models), side by side,
interleaved rounds, medians. bfloat16 needs oneDNN and a CPU with AVX512-BF16 or AMX.

    .venv/bin/python bench/bench_precision.py \
        --eval runs/demo/train/model=sample_data/dev.json \
        --eval runs/mini_multi_wide/model=../shared/data/speech-mini/dev.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def recognizers(bundle):
    from qn_keras.inference import SpeechRecognizer

    return {p: SpeechRecognizer(bundle, precision=p) for p in ("float32", "bfloat16")}


def evaluate(model_dir: Path, manifest: Path) -> dict:
    import tensorflow as tf

    from qn_keras.audio import decode_audio
    from qn_keras.metrics import cer, wer
    from qn_keras.model_dir import load_model_dir

    bundle = load_model_dir(model_dir)
    entries = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    refs, hyps = [], {"float32": [], "bfloat16": []}
    worst, frames, flips = 0.0, 0, 0
    modules = recognizers(bundle)
    for entry in entries:
        audio = decode_audio(manifest.parent / entry["audio_filepath"])[None]
        lengths = tf.constant([audio.shape[1]])
        outs = {p: m.serving_default(tf.constant(audio), lengths) for p, m in modules.items()}
        refs.append(entry["text"])
        for p, out in outs.items():
            hyps[p].append(out["transcripts"].numpy()[0].decode())
        n = int(outs["float32"]["logprob_lengths"][0])
        a, b = (outs[p]["logprobs"][0, :n].numpy() for p in ("float32", "bfloat16"))
        worst = max(worst, float(np.abs(a - b).max()))
        frames += n
        flips += int((a.argmax(-1) != b.argmax(-1)).sum())
    return {
        "model": str(model_dir),
        "manifest": str(manifest),
        "utterances": len(refs),
        **{f"wer_{p}": wer(refs, h) for p, h in hyps.items()},
        **{f"cer_{p}": cer(refs, h) for p, h in hyps.items()},
        "max_abs_logprob_diff": worst,
        "argmax_flip_fraction": flips / max(frames, 1),
        "transcripts_differing": sum(x != y for x, y in zip(*hyps.values(), strict=True)),
    }


def speed(preset: str, clips: dict, rounds: int) -> list[dict]:
    import tensorflow as tf
    from bench_inference import CONFIGS

    from qn_keras.featurizer import FeaturizerConfig
    from qn_keras.model_dir import ModelBundle
    from qn_keras.presets import build_model
    from qn_keras.tokenizer import CharTokenizer

    tf.keras.utils.set_random_seed(0)
    bundle = ModelBundle(build_model(preset), CharTokenizer(), FeaturizerConfig())
    modules = recognizers(bundle)
    times = {}
    for config in CONFIGS:
        w = tf.constant(clips[f"{config}_waveform"])
        n = tf.constant(clips[f"{config}_lengths"])
        for m in modules.values():
            m.serving_default(w, n)  # trace and warm up
        for _ in range(rounds):  # interleaved: both precisions see the same machine state
            for p, m in modules.items():
                t = time.perf_counter()
                m.serving_default(w, n)["transcripts"].numpy()
                times.setdefault((config, p), []).append(time.perf_counter() - t)
    rows = []
    for (config, p), ts in times.items():
        audio = float(clips[f"{config}_lengths"].sum()) / 16000
        median = statistics.median(ts)
        rows.append(
            {
                "preset": preset,
                "config": config,
                "precision": p,
                "median_s": median,
                "audio_s_per_s": audio / median,
            }
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", action="append", default=[], metavar="MODEL=MANIFEST")
    parser.add_argument("--speed-models", nargs="*", default=["quartznet_5x5", "quartznet_15x5"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precision.json")
    args = parser.parse_args(argv)
    from bench_inference import DEFAULT_MANIFEST, machine, make_clips

    from qn_keras.inference_graph import bfloat16_supported

    why = bfloat16_supported()
    if why:
        raise SystemExit(why)
    report = {"machine": machine(), "accuracy": [], "speed": []}
    for item in args.eval:
        model, manifest = item.split("=", 1)
        report["accuracy"].append(evaluate(Path(model), Path(manifest)))
        print(json.dumps(report["accuracy"][-1]), flush=True)
    clips = make_clips(DEFAULT_MANIFEST)
    for preset in args.speed_models:
        report["speed"] += speed(preset, clips, args.rounds)
        for row in report["speed"][-4:]:
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
