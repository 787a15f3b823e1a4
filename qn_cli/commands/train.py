"""`qn train`: train (or fine-tune) a QuartzNet from TFRecords or a manifest.

    qn train --config configs/quartznet_5x5.yaml --train feats/train --val feats/dev --out runs/x

DATA is a `qn features` output folder (or TFRecord files) or a manifest (.json/.csv/.tsv,
featurized once into DIR/cache). --train may be given several times (corpora featurized
separately, or one corpus in parts): the parts are read as one shuffled corpus. Started again
with the same command, a killed run resumes from its last checkpoint in DIR. Several GPUs are
used together (MirroredStrategy); with TF_CONFIG naming several workers,
MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import argparse


def register(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model (resumes a killed run)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True, help="YAML recipe, e.g. configs/quartznet_5x5.yaml"
    )
    parser.add_argument(
        "--train",
        required=True,
        action="append",
        metavar="DATA",
        help="training data: a `qn features` folder or a manifest (repeatable: read as one corpus)",
    )
    parser.add_argument("--val", metavar="DATA", help="validation data (WER/CER each epoch)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--init",
        metavar="MODEL",
        help="start from a model folder or a training run's checkpoint (fine-tuning)",
    )
    parser.add_argument("--max-steps", type=int, help="stop after N optimizer steps in all")
    parser.add_argument("--max-minutes", type=float, help="stop after M minutes of this run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from qn_cli.main import UserError
    from qn_keras.training import Trainer, TrainingDivergedError, load_config

    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1 (got {args.max_steps})")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UserError(f"--max-minutes must be > 0 (got {args.max_minutes})")
    config = load_config(args.config)
    trainer = Trainer(
        config,
        args.out,
        args.train,  # a list; one entry is read as that one source
        args.val,
        init_from=args.init,
        progress=not args.no_progress,
    )
    try:
        result = trainer.fit(max_steps=args.max_steps, max_minutes=args.max_minutes)
    except TrainingDivergedError as e:
        raise UserError(str(e)) from None
    report = result.report
    print(f"qn train: {result.steps} steps, stopped by {result.stopped_reason}")
    if result.best:
        print(
            f"  best: WER {result.best['wer']:.2%}, CER {result.best['cer']:.2%} "
            f"at step {result.best['step']}"
        )
    throughput = report["throughput"]
    if throughput["utterances_per_s"]:
        print(
            f"  throughput: {throughput['utterances_per_s']:.1f} utterances/s, "
            f"{throughput['audio_seconds_per_s']:.1f} s of audio/s"
        )
    if result.model_dir:
        print(f"  model: {result.model_dir}")
    print(f"  report: {result.out_dir / 'training_report.json'}")
    return 0
