"""Training benchmarks (not timed tests). Results go to BENCHMARKS.md by hand.

Throughput: a few training steps of a preset at a fixed batch size on this machine's devices,
through the real trainer (data pipeline, augmentation, NovoGrad update), with the per-step
median (the first step traces the graph and is left out)::

    python bench/bench_training.py throughput --preset quartznet_5x5 --batch-size 32 --steps 6

Accuracy: train on speech-mini (or any manifest / `qn features` folder) with a config and
evaluate the best model on the dev set::

    python bench/bench_training.py accuracy --config bench/speech_mini.yaml \\
        --train ../shared/data/speech-mini/train.json --val ../shared/data/speech-mini/dev.json \\
        --out runs/bench_speech_mini --max-minutes 40

Both print one JSON object (and the accuracy run leaves its training_report.json in --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech-mini"


def throughput(args) -> dict:
    import tensorflow as tf

    from qn_keras.training import TrainConfig, Trainer

    model = {"preset": args.preset}
    if args.model_config:
        import yaml

        model = yaml.safe_load(Path(args.model_config).read_text())["model"]
    config = TrainConfig.from_dict(
        {
            "model": model,
            "data": {"batch_size": args.batch_size, "bucket_boundaries": None},
            "training": {
                "epochs": 1000,
                "max_steps": args.steps,
                "precision": args.precision,
                "checkpoint_every_steps": 100000,
                "log_every_steps": 1,
            },
        }
    )
    name = Path(args.model_config).stem if args.model_config else args.preset
    out = Path(args.out) / f"{name}-b{args.batch_size}-{args.precision}"
    if out.exists():
        import shutil

        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "run.json").unlink(missing_ok=True)
    trainer = Trainer(config, out, args.train, None, progress=False, export_serving=False)
    start = time.monotonic()
    result = trainer.fit()
    report = result.report
    return {
        "benchmark": "training_throughput",
        "preset": name,
        "params": report["architecture"]["params"],
        "batch_size": args.batch_size,
        "precision": args.precision,
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "steps": result.steps,
        **report["throughput"],
        "wall_s": time.monotonic() - start,
        "data": args.train,
    }


def accuracy(args) -> dict:
    from qn_keras.model_dir import load_model_dir
    from qn_keras.training import Trainer, load_config
    from qn_keras.training.evaluation import evaluate

    config = load_config(args.config)
    start = time.monotonic()
    trainer = Trainer(config, args.out, args.train, args.val, progress=not args.no_progress)
    result = trainer.fit(max_minutes=args.max_minutes)
    bundle = load_model_dir(result.model_dir)
    dataset = trainer.val_data.dataset(
        config.data.eval_batch_size, training=False, with_metadata=True
    )
    dev = evaluate(bundle.model, dataset, bundle.tokenizer, keep_utterances=True)
    examples = sorted(dev.utterances, key=lambda r: r["wer"])
    return {
        "benchmark": "training_accuracy",
        "config": str(args.config),
        "train": args.train,
        "val": args.val,
        "params": result.report["architecture"]["params"],
        "steps": result.steps,
        "epochs": result.report["epochs_completed"],
        "stopped_reason": result.stopped_reason,
        "wall_s": time.monotonic() - start,
        "throughput": result.report["throughput"],
        "dev_wer": dev.wer,
        "dev_cer": dev.cer,
        "best": result.best,
        "examples": [
            {"reference": r["reference"], "hypothesis": r["hypothesis"]}
            for r in (examples[:2] + examples[len(examples) // 2 : len(examples) // 2 + 2])
        ],
    }


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--preset", default="quartznet_5x5")
    t.add_argument(
        "--model-config", help="take the model section of this training YAML instead of --preset"
    )
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--steps", type=int, default=6, help="steps in all; the first is not timed")
    t.add_argument("--precision", default="float32")
    t.add_argument("--train", default=str(DEFAULT_DATA / "train.json"))
    t.add_argument("--out", default=str(REPO / "runs" / "bench_throughput"))
    a = sub.add_parser("accuracy")
    a.add_argument("--config", default=str(REPO / "bench" / "speech_mini.yaml"))
    a.add_argument("--train", default=str(DEFAULT_DATA / "train.json"))
    a.add_argument("--val", default=str(DEFAULT_DATA / "dev.json"))
    a.add_argument("--out", default=str(REPO / "runs" / "bench_speech_mini"))
    a.add_argument("--max-minutes", type=float, default=None)
    a.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = throughput(args) if args.mode == "throughput" else accuracy(args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
