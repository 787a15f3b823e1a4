"""Optimization benchmark: every configuration of the quantized-QuartzNet table, one report.

Runs, through the `qn` CLI, each step only if its output is missing (so an interrupted run is
continued by running it again):

1. float models: `qn train` with bench/optimize/base.yaml (and base_g2.yaml, base_g4.yaml for
   the grouped-pointwise rows) on --train, validated on --val;
2. post-training conversions of the float model: float32 (baseline), float16, int8 (full
   integer, calibrated on 100 training utterances);
3. quantization-aware fine-tuning: int8 per channel, int8 per tensor, 4-bit per channel;
4. pruning to 50% and 80%, and the 80% model quantization-aware fine-tuned to int8;
5. float32 TFLite of the grouped models;
6. `qn optimize report` over all of them on --val, and a TFLite speed table of all of them
   (fixed 5 s input; XNNPACK and built-in kernels; 1 thread; median of interleaved rounds).

    .venv/bin/python bench/bench_optimize.py [--train sample_data/train.json]
        [--val sample_data/dev.json] [--out runs/opt] [--qat-steps 96] [--prune-steps 400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
QN = [sys.executable, "-m", "qn_cli.main"]
CONFIGS = REPO / "bench" / "optimize"


def qn(*args, log: Path):
    """Runs one `qn` command, its output appended to ``log``; raises on failure."""
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n$ qn {' '.join(map(str, args))}\n")
        f.flush()
        done = subprocess.run([*QN, *map(str, args)], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"qn {args[0]} failed (exit {done.returncode}); see {log}")
    return time.monotonic() - start


def step(name: str, target: Path, timings: dict, *args, log: Path):
    if target.exists():
        print(f"[skip] {name}: {target} exists")
        return
    print(f"[run ] {name} ...", flush=True)
    timings[name] = qn(*args, log=log)
    (log.parent / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"       {timings[name]:.0f} s")


def speed_table(paths: dict, threads=(1,), rounds=5) -> dict:
    """Seconds of audio per CPU second and per wall second for a fixed 5 s input, with the
    XNNPACK delegate and with TFLite's built-in kernels: the median of ``rounds`` interleaved
    rounds (the machine is shared: single measurements of one model vary by +-20%)."""
    import statistics

    sys.path.insert(0, str(REPO))
    from qn_keras.optimization.tflite import speed

    runs: dict = {}
    for _ in range(rounds):
        for name, path in paths.items():
            for t in threads:
                for engine in ("xnnpack", "builtin"):
                    key = f"{name}|{engine}|{t}"
                    result = speed(path, threads=t, engine=engine, repeat=2, invokes=5)
                    runs.setdefault(key, []).append(result)
    return {
        key: {k: statistics.median(r[k] for r in results) for k in ("cpu", "wall")}
        for key, results in runs.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default="sample_data/train.json")
    parser.add_argument("--val", default="sample_data/dev.json")
    parser.add_argument("--out", default="runs/opt")
    parser.add_argument("--qat-steps", type=int, default=96)
    parser.add_argument("--prune-steps", type=int, default=400)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench_optimize.log"
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    data = ["--train", args.train]
    finetune = ["--val", args.val, "--config", CONFIGS / "finetune.yaml", "--no-progress"]

    def train(suffix: str):
        run = out / f"train{suffix or '_float'}"
        config = CONFIGS / f"base{suffix}.yaml"
        args_ = ["train", "--config", config, *data, "--val", args.val, "--out", run]
        step(run.name, run / "model", timings, *args_, "--no-progress", log=log)

    def job(name: str, *args_):
        step(name, out / name / "model", timings, "optimize", *args_, "--out", out / name, log=log)

    train("")
    float_model = out / "train_float" / "model"
    for mode in ("float32", "float16", "int8"):
        job(f"ptq_{mode}", "ptq", "--model", float_model, "--mode", mode, *data)
    for scheme in ("int8_per_channel", "int8_per_tensor", "int4_per_channel"):
        job(
            f"qat_{scheme}",
            "qat",
            "--model",
            float_model,
            *data,
            "--scheme",
            scheme,
            "--steps",
            args.qat_steps,
            *finetune,
        )
    for sparsity in (50, 80):
        job(
            f"prune{sparsity}",
            "prune",
            "--model",
            float_model,
            *data,
            "--target-sparsity",
            sparsity / 100,
            "--steps",
            args.prune_steps,
            *finetune,
        )
    job(
        "prune80_qat_int8",
        "qat",
        "--model",
        out / "prune80" / "model",
        *data,
        "--scheme",
        "int8_per_channel",
        "--steps",
        args.qat_steps,
        *finetune,
    )
    for g in (2, 4):
        train(f"_g{g}")
        job(
            f"g{g}_float32",
            "ptq",
            "--model",
            out / f"train_g{g}" / "model",
            "--mode",
            "float32",
            "--name",
            f"float32_g{g}",
        )
    timings_path.write_text(json.dumps(timings, indent=1))

    configs = [
        "ptq_float32",
        "ptq_float16",
        "qat_int8_per_channel",
        "qat_int8_per_tensor",
        "qat_int4_per_channel",
        "ptq_int8",
        "prune50",
        "prune80",
        "prune80_qat_int8",
        "g2_float32",
        "g4_float32",
    ]
    step(
        "report",
        out / "report" / "optimization_report.json",
        timings,
        "optimize",
        "report",
        "--configs",
        *[out / c for c in configs],
        "--manifest",
        args.val,
        "--out",
        out / "report",
        "--threads",
        "1",
        "--no-progress",
        log=log,
    )

    paths = {c: out / c / "model" / "model.tflite" for c in configs}
    speeds = speed_table(paths)
    (out / "report" / "speed.json").write_text(json.dumps(speeds, indent=1))
    for key, value in speeds.items():
        print(f"{key:<40} {value['cpu']:8.1f} s audio / CPU s {value['wall']:8.1f} / wall s")


if __name__ == "__main__":
    main()
