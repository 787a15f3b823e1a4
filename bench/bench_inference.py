"""Inference speed, waveform in and text out: seconds of audio transcribed per second.

For QuartzNet 5x5 and 15x5 (random weights: speed does not depend on them), batch 1 with one
20 s clip and batch 8 with 5 s clips, side by side in one run:

- `keras`: the Keras model as a user runs it: featurizer layer, `model.predict_on_batch`,
  greedy decoding in NumPy;
- `savedmodel_keras_graph`: the `serving_default` graph without the inference rewrite (the
  Keras layers as trained: what exports served before `qn_keras.inference_graph`);
- `savedmodel`: the exported `serving_default` signature (featurizer, rewritten encoder and
  greedy decoding in one graph), loaded with tf.saved_model.load;
- `tflite_*`: the exported split TFLite pair (`featurizer.tflite` + `encoder_<mode>.tflite`,
  batch 1: a batch of 8 is 8 invocations) with greedy decoding in NumPy, on TensorFlow 2.15's
  TFLite with XNNPACK (`tflite_`) or on the LiteRT runtime (`litert_`), 1 or 2 threads
  (`_1t`, `_2t`); `_int8` is the full-integer encoder of `qn optimize ptq --mode int8`
  (calibrated on 16 speech-mini train utterances) behind the same float featurizer;
- `nemo_pytorch`, `nemo_onnxruntime`: NVIDIA NeMo's own model of the same size in PyTorch
  and its ONNX export in ONNX Runtime (bench/nemo_inference_worker.py, run in .venv-nemo on
  the same clips, when that venv exists and --no-nemo is not given).

Then the local server (`qn serve`, 5x5) under 8 concurrent clients (4 REST, 4 gRPC) sending
5 s WAV files to `transcribe_wav` for --server-seconds: throughput, p50/p99 latency, failures.

Each figure is the median of at least --min-runs timed runs (and --min-seconds of them) after
one warm-up run. Results: a Markdown table on stdout and JSON in --out.

Usage: .venv/bin/python bench/bench_inference.py [--presets quartznet_5x5 quartznet_15x5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO.parent / "shared" / "data" / "speech-mini" / "dev.json"
CONFIGS = {"b1_20s": (1, 20.0), "b8_5s": (8, 5.0)}
ENGINES = (
    "keras",
    "savedmodel_keras_graph",
    "savedmodel",
    "tflite_float32_1t",
    "tflite_float32_2t",
    "litert_float32_1t",
    "litert_float32_2t",
    "litert_int8_1t",
    "litert_int8_2t",
    "nemo_pytorch",
    "nemo_onnxruntime",
)
CALIBRATION_MANIFEST = REPO.parent / "shared" / "data" / "speech-mini" / "train.json"


def make_clips(manifest: Path) -> dict[str, np.ndarray]:
    """Speech clips of exactly the configured lengths: consecutive manifest utterances
    concatenated and cut, so every engine transcribes the same real speech."""
    from qn_keras.audio import decode_audio

    entries = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    stream, position = [], 0

    def take(samples: int) -> np.ndarray:
        nonlocal position
        while sum(len(s) for s in stream) < samples:
            entry = entries[position % len(entries)]
            position += 1
            stream.append(decode_audio(manifest.parent / entry["audio_filepath"]))
        audio = np.concatenate(stream)
        stream[:] = [audio[samples:]]
        return audio[:samples]

    clips = {}
    for name, (batch, seconds) in CONFIGS.items():
        waveforms = np.stack([take(int(seconds * 16000)) for _ in range(batch)])
        clips[f"{name}_waveform"] = waveforms.astype(np.float32)
        clips[f"{name}_lengths"] = np.full(batch, waveforms.shape[1], dtype=np.int32)
    return clips


def timed(fn, min_runs: int, min_seconds: float) -> list[float]:
    fn()  # warm-up: tracing, allocation
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return times


def calibration_features(bundle, manifest: Path, count: int = 16) -> list[np.ndarray]:
    """Features of the first ``count`` utterances of ``manifest`` for int8 calibration."""
    from qn_keras.audio import decode_audio

    entries = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    featurizer = bundle.featurizer_layer()
    out = []
    for entry in entries[:count]:
        audio = decode_audio(manifest.parent / entry["audio_filepath"])[None]
        features, lengths = featurizer(audio, [audio.shape[1]], training=False)
        out.append(features[0, : int(lengths[0])].numpy())
    return out


def tf_engines(preset: str, workdir: Path, calibration: Path):
    """name -> fn(waveform [B, S], lengths [B]) -> transcripts, plus the export folder."""
    import tensorflow as tf

    from qn_keras import tflite as lite
    from qn_keras.decoding import greedy_decode_batch
    from qn_keras.featurizer import FeaturizerConfig
    from qn_keras.inference import SpeechRecognizer
    from qn_keras.model_dir import ModelBundle
    from qn_keras.optimization import tflite as optimization_tflite
    from qn_keras.presets import build_model
    from qn_keras.tokenizer import CharTokenizer
    from serving.export import export_model
    from serving.tflite import TFLiteRecognizer

    tf.keras.utils.set_random_seed(0)
    tokenizer = CharTokenizer()
    bundle = ModelBundle(build_model(preset), tokenizer, FeaturizerConfig())
    # With warmup requests: the server replays them at load, as TF Serving does.
    version_dir = export_model(bundle, workdir, preset, tflite_modes=("float32",))
    loaded = tf.saved_model.load(str(version_dir))
    unrewritten = SpeechRecognizer(bundle, rewrite=False)
    featurizer = bundle.featurizer_layer()
    blank = tokenizer.blank_id

    def keras(waveform, lengths):
        features, feature_lengths = featurizer(waveform, lengths, training=False)
        logprobs, out_lengths = bundle.model.predict_on_batch([features, feature_lengths])
        return [tokenizer.decode(ids) for ids in greedy_decode_batch(logprobs, out_lengths, blank)]

    signature = loaded.signatures["serving_default"]

    def savedmodel(waveform, lengths):
        out = signature(waveform=tf.constant(waveform), lengths=tf.constant(lengths))
        return [t.decode() for t in out["transcripts"].numpy()]

    def keras_graph(waveform, lengths):
        out = unrewritten.serving_default(tf.constant(waveform), tf.constant(lengths))
        return [t.decode() for t in out["transcripts"].numpy()]

    int8_path = workdir / f"{preset}_int8.tflite"
    representative = calibration_features(bundle, calibration) if calibration.is_file() else None
    if representative:
        blob = optimization_tflite.convert(
            bundle.model, "int8", representative_features=representative
        )
        int8_path.write_bytes(blob)

    def tflite(engine, threads, encoder=None):
        runner = TFLiteRecognizer(
            version_dir / "tflite" / "float32.tflite", threads, engine, encoder=encoder
        )

        def run(waveform, lengths):
            texts = []
            for row, n in zip(waveform, lengths, strict=True):
                logprobs = runner.logprobs(row[:n])
                ids = greedy_decode_batch(logprobs[None], [len(logprobs)], blank)[0]
                texts.append(tokenizer.decode(ids))
            return texts

        return run

    engines = {
        "keras": keras,
        "savedmodel_keras_graph": keras_graph,
        "savedmodel": savedmodel,
        "tflite_float32_1t": tflite("xnnpack", 1),
        "tflite_float32_2t": tflite("xnnpack", 2),
    }
    if lite.litert_available():
        engines["litert_float32_1t"] = tflite("litert", 1)
        engines["litert_float32_2t"] = tflite("litert", 2)
        if representative:
            engines["litert_int8_1t"] = tflite("litert", 1, int8_path)
            engines["litert_int8_2t"] = tflite("litert", 2, int8_path)
    else:
        print("LiteRT rows skipped: ai-edge-litert is not installed", file=sys.stderr)
    return engines, version_dir


def run_nemo(clips_path: Path, out: Path, presets, args) -> dict | None:
    python = REPO / ".venv-nemo" / "bin" / "python"
    if not python.exists():
        print(f"NeMo rows skipped: {python} not found", file=sys.stderr)
        return None
    cmd = [str(python), str(REPO / "bench" / "nemo_inference_worker.py")]
    cmd += ["--clips", str(clips_path), "--out", str(out), "--presets", *presets]
    cmd += ["--min-runs", str(args.min_runs), "--min-seconds", str(args.min_seconds)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"NeMo worker failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server(model_base: Path, clip: np.ndarray, seconds: float, clients: int = 8) -> dict:
    """`qn serve` in its own process; `clients` threads (half REST, half gRPC) send one 5 s
    WAV per request for `seconds`."""
    from serving.client import GrpcClient, RestClient, ServingError
    from serving.export import encode_wav

    rest_port, grpc_port = _free_port(), _free_port()
    cmd = [str(REPO / ".venv" / "bin" / "qn"), "serve", "--model", str(model_base)]
    cmd += ["--port", str(rest_port), "--grpc-port", str(grpc_port)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        name = model_base.name
        rest = RestClient(f"http://127.0.0.1:{rest_port}", name, timeout=120)
        deadline = time.time() + 600
        while True:
            try:
                rest.status()
                break
            except ServingError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"qn serve did not start:\n{server.stdout.read()}") from None
                time.sleep(1)
        wav = encode_wav(clip, 16000)
        latencies, failures, lock = {"rest": [], "grpc": []}, [], threading.Lock()
        stop_at = [0.0]
        # The barrier's action sets the deadline before any worker is released.
        ready = threading.Barrier(
            clients + 1, action=lambda: stop_at.__setitem__(0, time.perf_counter() + seconds)
        )

        def worker(index):
            protocol = "rest" if index % 2 == 0 else "grpc"
            if protocol == "rest":
                client = RestClient(f"http://127.0.0.1:{rest_port}", name, timeout=120)
            else:
                client = GrpcClient(f"127.0.0.1:{grpc_port}", name, timeout=120)
            client.transcribe_wav([wav])  # untimed: connection set-up, first-call work
            ready.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                try:
                    client.transcribe_wav([wav])
                    with lock:
                        latencies[protocol].append(time.perf_counter() - t)
                except ServingError as e:
                    with lock:
                        failures.append(str(e))
            client.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        ready.wait()
        start = stop_at[0] - seconds
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    every = latencies["rest"] + latencies["grpc"]
    clip_seconds = len(clip) / 16000
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": len(every),
        "failed": len(failures),
        "failures": failures[:5],
        "requests_per_s": len(every) / elapsed,
        "audio_s_per_s": len(every) * clip_seconds / elapsed,
        "p50_ms": 1000 * float(np.percentile(every, 50)) if every else None,
        "p99_ms": 1000 * float(np.percentile(every, 99)) if every else None,
        "rest_requests": len(latencies["rest"]),
        "grpc_requests": len(latencies["grpc"]),
    }


def markdown(results: list[dict], server: dict | None) -> str:
    lines = [
        "| model | batch x clip | " + " | ".join(ENGINES) + " |",
        "|---|---|" + "---:|" * len(ENGINES),
    ]
    cells = {(r["preset"], r["config"], r["engine"]): r["audio_s_per_s"] for r in results}
    for preset in dict.fromkeys(r["preset"] for r in results):
        for config, (batch, seconds) in CONFIGS.items():
            row = [
                f"{cells[(preset, config, e)]:.1f}" if (preset, config, e) in cells else "n/a"
                for e in ENGINES
            ]
            lines.append(f"| {preset} | {batch} x {seconds:g} s | " + " | ".join(row) + " |")
    if server:
        lines += [
            "",
            f"Local server (`qn serve`, quartznet_5x5, transcribe_wav, 5 s WAV per request), "
            f"{server['clients']} concurrent clients for {server['seconds']:.0f} s: "
            f"{server['requests']} requests ({server['rest_requests']} REST, "
            f"{server['grpc_requests']} gRPC), {server['failed']} failed, "
            f"{server['requests_per_s']:.2f} requests/s = {server['audio_s_per_s']:.1f} s of "
            f"audio/s, latency p50 {server['p50_ms']:.0f} ms, p99 {server['p99_ms']:.0f} ms.",
        ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["quartznet_5x5", "quartznet_15x5"])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--min-runs", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--server-seconds", type=float, default=60.0)
    parser.add_argument("--no-nemo", action="store_true", help="skip NeMo's rows")
    parser.add_argument("--calibration", type=Path, default=CALIBRATION_MANIFEST)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "inference.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    workdir = Path(tempfile.mkdtemp(prefix="qn-bench-inference-"))
    clips = make_clips(args.manifest)
    clips_path = workdir / "clips.npz"
    np.savez(clips_path, **clips)
    results, exports = [], {}
    for preset in args.presets:
        engines, exports[preset] = tf_engines(preset, workdir / "exports", args.calibration)
        for config in CONFIGS:
            waveform, lengths = clips[f"{config}_waveform"], clips[f"{config}_lengths"]
            for engine, fn in engines.items():
                times = timed(
                    lambda fn=fn, w=waveform, n=lengths: fn(w, n), args.min_runs, args.min_seconds
                )
                median = statistics.median(times)
                results.append(
                    {
                        "preset": preset,
                        "config": config,
                        "engine": engine,
                        "median_s": median,
                        "runs": len(times),
                        "audio_s_per_s": float(lengths.sum()) / 16000 / median,
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    versions = {"tensorflow": tf.__version__, "python": platform.python_version()}
    nemo_note = "NeMo rows skipped (--no-nemo)"
    if not args.no_nemo:
        nemo = run_nemo(clips_path, workdir / "nemo.json", args.presets, args)
        nemo_note = "NeMo rows skipped (no .venv-nemo or the worker failed)"
        if nemo:
            results += nemo["results"]
            versions.update(nemo["versions"])
            nemo_note = None
    if nemo_note:
        print(nemo_note, file=sys.stderr)
    server = None
    if args.server_seconds > 0 and "quartznet_5x5" in exports:
        clip = clips["b8_5s_waveform"][0]
        server = bench_server(exports["quartznet_5x5"].parent, clip, args.server_seconds)
        print(json.dumps(server), flush=True)
    report = {
        "machine": machine(),
        "nemo": nemo_note or "measured",
        "versions": versions,
        "results": results,
        "server": server,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(results, server))
    m = report["machine"]
    print(
        f"\nMachine: {m['cpu']} ({m['cpus']} CPUs; {m['isa']}); load average at start "
        f"{m['load_average_start'][0]:.2f}." + (f" {nemo_note}." if nemo_note else "")
    )


def machine() -> dict:
    """The CPU model, its vector/matrix extensions, CPU count and load, for every figure."""
    info = {"cpu": platform.processor() or "unknown", "isa": "", "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                info["isa"] = " ".join(f for f in wanted if f in flags)
                break
    except OSError:
        pass
    info["load_average_start"] = LOAD_AT_START
    return info


LOAD_AT_START = os.getloadavg()


if __name__ == "__main__":
    main()
