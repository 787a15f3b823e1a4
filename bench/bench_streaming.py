"""Streaming benchmarks (issue 15; not timed tests). Results go to BENCHMARKS.md by hand.

Accuracy: every utterance of a manifest fed 0.1 s at a time, WER against offline
transcription of the same model (per-utterance normalization), for buffered streaming at
several chunk lengths and normalization rules, and stateful streaming for models trained with
a lookahead; for those also the largest difference between the stream's log-probs and the
model's offline log-probs under the same normalization::

    python bench/bench_streaming.py accuracy --model runs/stream/full_s0/model \\
        --manifest sample_data/dev.json --out bench/results/streaming_sample_full.json

A model folder without a feature prior gets one from ``--prior-audio`` (files, folders or
manifests of its training audio), as `qn model prior` would write.

Latency: compute per 1 s chunk (p50, p99) and real-time factor of the stateful stream step of a
5x5-size model with a lookahead (SavedModel ``stream_step`` and the streaming TFLite, 1 and 2
threads), and of buffered mode on the full-context 5x5 beside it; state size per stream::

    python bench/bench_streaming.py latency --out bench/results/streaming_latency.json

Both print one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_lm import machine  # noqa: E402

BLOCK = 1600  # samples fed at a time: 0.1 s, a microphone's period


def _load(model_dir, prior_audio):
    from qn_keras.model_dir import load_model_dir
    from qn_keras.streaming.normalization import METADATA_KEY, prior_from_metadata
    from qn_keras.streaming.prior import audio_paths, prior_from_audio

    bundle = load_model_dir(model_dir)
    prior = prior_from_metadata(bundle.metadata)
    if prior is None and prior_audio:
        prior = prior_from_audio(audio_paths(prior_audio), bundle.featurizer_layer())
        bundle.metadata[METADATA_KEY] = prior.to_dict()
    return bundle, prior


def _items(manifest):
    from qn_keras.audio import decode_audio
    from qn_keras.data.manifest import load_utterances

    out = []
    for utt in load_utterances(manifest):
        out.append((utt.text, decode_audio(utt.audio_filepath, 16000), None))
    return out


def _stream(engine_factory, labels, settings, waveform):
    from qn_keras.streaming.recognizer import StreamingRecognizer

    stream = StreamingRecognizer(engine_factory(), labels, settings)
    for start in range(0, len(waveform), BLOCK):
        stream.feed(waveform[start : start + BLOCK])
    return stream.finish(), stream.logprobs if settings.keep_logprobs else None


def accuracy(args) -> dict:
    import tensorflow as tf

    from qn_keras.inference import SpeechRecognizer
    from qn_keras.metrics import cer, wer
    from qn_keras.streaming.recognizer import (
        BufferedEngine,
        StatefulEngine,
        StreamSettings,
        stream_step_of,
    )

    bundle, prior = _load(args.model, args.prior_audio)
    items = _items(args.manifest)
    refs = [text for text, _, _ in items]
    labels = bundle.tokenizer.labels
    module = SpeechRecognizer(bundle)
    seconds = sum(len(w) for _, w, _ in items) / 16000

    offline = []
    for _, waveform, _ in items:
        out = module.serving_default(tf.constant(waveform[None]), tf.constant([len(waveform)]))
        offline.append(out["transcripts"].numpy()[0].decode())
    rows = [
        {
            "mode": "offline",
            "normalization": "per utterance",
            "chunk_s": None,
            "wer": wer(refs, offline),
            "cer": cer(refs, offline),
        }
    ]

    def add(mode, rule, chunk, hyps, started, extra=None):
        row = {
            "mode": mode,
            "normalization": rule,
            "chunk_s": chunk,
            "wer": wer(refs, hyps),
            "cer": cer(refs, hyps),
            "wer_delta_points": 100 * (wer(refs, hyps) - rows[0]["wer"]),
            "seconds_per_audio_second": (time.perf_counter() - started) / seconds,
        }
        row.update(extra or {})
        rows.append(row)
        print(json.dumps(row), flush=True)

    cfg = bundle.featurizer
    rules = [("running", None)]
    if prior:
        rules += [(rule, n) for rule in ("pooled", "adaptive") for n in args.prior_frames]
        rules += [("fixed", None)]
    if cfg.causal:  # trained for streaming: its front end's own rule, offline too
        rules = [(cfg.normalize, cfg.prior_frames)]
        rows[0]["normalization"] = f"{cfg.normalize} (the model's front end)"
    for chunk in args.chunks:
        for rule, prior_frames in rules:
            settings = StreamSettings(
                mode="buffered",
                chunk_seconds=chunk,
                normalization=rule,
                prior_frames=prior_frames or 300.0,
                left_seconds=args.left,
                right_seconds=args.right,
            )

            def engine(settings=settings):
                return BufferedEngine(
                    module.log_mel, module.encode, bundle.featurizer, module.stride, settings, prior
                )

            started = time.perf_counter()
            hyps = [_stream(engine, labels, settings, w)[0] for _, w, _ in items]
            extra = {"left_s": args.left, "right_s": args.right, "prior_frames": prior_frames}
            add("buffered", rule, chunk, hyps, started, extra)

    if getattr(bundle.model, "lookahead", None) is not None and (prior or cfg.causal):
        featurizer = bundle.featurizer_layer()
        stateful_rules = [("adaptive", n) for n in args.prior_frames] + [("fixed", None)]
        if cfg.causal:
            stateful_rules = [(cfg.normalize, cfg.prior_frames)]
        for rule, prior_frames in stateful_rules:
            settings = StreamSettings(
                mode="stateful",
                chunk_seconds=1.0,
                normalization=rule,
                prior_frames=prior_frames or 300.0,
                keep_logprobs=True,
            )
            step, info = stream_step_of(bundle, settings, prior)
            started = time.perf_counter()
            hyps, worst = [], 0.0
            for _, waveform, _ in items:
                text, logprobs = _stream(
                    lambda step=step, info=info, settings=settings: StatefulEngine(
                        step, info, bundle.featurizer, settings
                    ),
                    labels,
                    settings,
                    waveform,
                )
                hyps.append(text)
                # The same model offline on the whole utterance, normalized the same way.
                log_mel, length = featurizer.log_mel(waveform[None], [len(waveform)])
                frames = log_mel[0, : int(length[0])].numpy()
                if cfg.causal:  # the model's own offline front end
                    normalized, _ = featurizer(waveform[None], tf.constant([len(waveform)]))
                    features = normalized[0, : int(length[0])].numpy()
                else:
                    features = _normalize_like_stream(frames, prior, prior_frames)
                lp, n = bundle.model([features[None], tf.constant([len(features)])], training=False)
                worst = max(worst, float(np.abs(lp[0, : int(n[0])].numpy() - logprobs).max()))
            add(
                "stateful",
                rule,
                1.0,
                hyps,
                started,
                {
                    "max_abs_logprob_diff_vs_offline_same_normalization": worst,
                    "latency_s": 1.0 + info["lookahead_seconds"],
                    "state_floats": info["state_size"],
                    "prior_frames": prior_frames,
                },
            )
    return {
        "machine": machine(),
        "model": str(args.model),
        "manifest": str(args.manifest),
        "utterances": len(items),
        "audio_seconds": round(seconds, 1),
        "lookahead": getattr(bundle.model, "lookahead", None),
        "rows": rows,
    }


def _normalize_like_stream(frames, prior, prior_frames):
    from qn_keras.streaming.normalization import Normalizer

    rule = "fixed" if prior_frames is None else "adaptive"
    normalizer = Normalizer(rule, frames.shape[1], prior, prior_frames or 1.0)
    return normalizer.normalize(normalizer.add(frames))


def _percentiles(times) -> dict:
    ms = 1000 * np.asarray(times)
    return {
        "p50_ms": round(float(np.median(ms)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def latency(args) -> dict:
    import tensorflow as tf

    from qn_keras.featurizer import FeaturizerConfig, LogMelSpectrogram
    from qn_keras.inference import SpeechRecognizer
    from qn_keras.model_dir import ModelBundle
    from qn_keras.presets import build_model
    from qn_keras.streaming.normalization import METADATA_KEY
    from qn_keras.streaming.prior import audio_paths, prior_from_audio
    from qn_keras.streaming.recognizer import BufferedEngine, StreamSettings
    from qn_keras.tokenizer import CharTokenizer
    from serving.export import export_model
    from serving.streaming import TFLiteStreamStep

    tf.keras.utils.set_random_seed(0)
    prior = prior_from_audio(
        audio_paths([REPO / "sample_data" / "train.json"]), LogMelSpectrogram(), limit=50
    )
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.05, 16000 * (args.chunks + 2)).astype(np.float32)
    chunk = 16000
    results = {
        "machine": machine(),
        "tensorflow": tf.__version__,
        "chunk_s": 1.0,
        "chunks_timed": args.chunks,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.preset, lookahead=args.lookahead)
        bundle = ModelBundle(
            model, CharTokenizer(), FeaturizerConfig(), metadata={METADATA_KEY: prior.to_dict()}
        )
        version = export_model(bundle, tmp, "la", tflite_modes=("float32",))
        loaded = tf.saved_model.load(str(version))
        meta = json.loads((version / "assets.extra" / "qn_export.json").read_text())
        info = meta["streaming"]
        results.update(
            preset=args.preset,
            params=int(model.count_params()),
            lookahead_frames=args.lookahead,
            algorithmic_latency_s=round(1.0 + info["lookahead_seconds"], 3),
            state_floats=info["state_size"],
            state_kib=round(4 * info["state_size"] / 1024, 1),
        )
        step = loaded.signatures["stream_step"]

        def saved_model_runner():
            state = tf.zeros([1, info["state_size"]])
            counters = tf.zeros([1, 3], tf.int32)
            times = []
            for i in range(args.chunks + 2):
                x = tf.constant(audio[None, i * chunk : (i + 1) * chunk])
                started = time.perf_counter()
                out = step(
                    audio=x,
                    state=state,
                    counters=counters,
                    end=tf.constant([-1]),
                    text=tf.constant([""]),
                )
                state, counters = out["state"], out["counters"]
                _ = out["logprobs"].numpy()
                times.append(time.perf_counter() - started)
            return times[2:]  # the first calls plan the graph

        def tflite_runner(threads):
            runner = TFLiteStreamStep(version / "tflite" / "stream_float32.tflite", threads)

            def run():
                state = np.zeros([1, info["state_size"]], np.float32)
                counters = np.zeros([1, 3], np.int32)
                times = []
                for i in range(args.chunks + 2):
                    x = audio[None, i * chunk : (i + 1) * chunk]
                    started = time.perf_counter()
                    out = runner(x, state, counters, np.array([-1], np.int32))
                    state, counters = out["state"], out["counters"]
                    times.append(time.perf_counter() - started)
                return times[2:]

            return run

        # Buffered mode of the same-size full-context model, beside it.
        full = build_model(args.preset)
        full_bundle = ModelBundle(
            full, CharTokenizer(), FeaturizerConfig(), metadata={METADATA_KEY: prior.to_dict()}
        )
        module = SpeechRecognizer(full_bundle)
        settings = StreamSettings(mode="buffered")

        def buffered_runner():
            engine = BufferedEngine(
                module.log_mel,
                module.encode,
                full_bundle.featurizer,
                module.stride,
                settings,
                prior,
            )
            times = []
            for i in range(args.chunks + 4):
                x = audio[i * chunk : (i + 1) * chunk]
                started = time.perf_counter()
                engine.push(x)
                times.append(time.perf_counter() - started)
            return times[4:]  # once the 2 s left context is full

        runners = {
            "stateful SavedModel stream_step": saved_model_runner,
            "stateful TFLite float32, 1 thread": tflite_runner(1),
            "stateful TFLite float32, 2 threads": tflite_runner(2),
            "buffered SavedModel (2 s left, 0.5 s right context)": buffered_runner,
        }
        collected = {name: [] for name in runners}
        for _ in range(args.repeat):  # interleaved, so load hits every runner alike
            for name, run in runners.items():
                collected[name] += run()
        for name, times in collected.items():
            row = {
                "runtime": name,
                **_percentiles(times),
                "real_time_factor": round(float(np.median(times)) / 1.0, 4),
            }
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--model", required=True)
    acc.add_argument("--manifest", required=True)
    acc.add_argument("--prior-audio", nargs="*", default=[])
    acc.add_argument("--chunks", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    acc.add_argument("--left", type=float, default=2.0)
    acc.add_argument("--right", type=float, default=0.5)
    acc.add_argument("--prior-frames", type=float, nargs="+", default=[300.0])
    acc.add_argument("--out")
    lat = sub.add_parser("latency")
    lat.add_argument("--preset", default="quartznet_5x5")
    lat.add_argument("--lookahead", type=int, default=24)
    lat.add_argument("--chunks", type=int, default=30)
    lat.add_argument("--repeat", type=int, default=3)
    lat.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = accuracy(args) if args.what == "accuracy" else latency(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
