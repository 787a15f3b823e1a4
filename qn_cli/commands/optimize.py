"""`qn optimize`: quantization-aware training, pruning, post-training quantization, report.

    qn optimize qat   --model DIR --train DATA --val DATA --out OUT --scheme int8_per_channel
    qn optimize prune --model DIR --train DATA --out OUT --target-sparsity 0.8
    qn optimize ptq   --model DIR --out OUT --mode int8 --train DATA
    qn optimize report --configs OUT1 OUT2 ... --manifest dev.json --out REPORT

qat and prune fine-tune a model folder (trained with `qn train`, imported with `qn import-nemo`,
or pruned) with the trainer (`--config` recipe, default NeMo's at learning rate 0.001); a
pruned model given to qat keeps its zeros. ptq converts without training: float32 (baseline),
float16, dynamic (int8 weights) or int8 (full integer, calibrated on --samples utterances of
--train). Each job writes OUT/model/ (model folder with the serving SavedModel, plus
model.tflite: log-mel features in, logits out). report evaluates every configuration on a
manifest through TFLite and Keras and writes a Markdown table, JSON and two PNG plots.
"""

from __future__ import annotations

import argparse

from qn_keras import choices


def register(subparsers):
    parser = subparsers.add_parser(
        "optimize",
        help="quantize (QAT/PTQ), prune, and compare models in one report",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jobs = parser.add_subparsers(dest="job", metavar="JOB")
    jobs.required = True

    qat = jobs.add_parser("qat", help="quantization-aware fine-tuning")
    _model_io(qat, train_required=True)
    qat.add_argument(
        "--scheme",
        default="int8_per_channel",
        choices=choices.QAT_SCHEMES,
        help="weights: 8-bit per channel, 8-bit per tensor, or 4-bit per channel with the first "
        "block and the CTC head at 8 bit; activations are 8-bit (default: %(default)s)",
    )
    _finetune_args(qat)
    qat.set_defaults(func=run_qat)

    prune = jobs.add_parser("prune", help="magnitude pruning during fine-tuning")
    _model_io(prune, train_required=True)
    prune.add_argument(
        "--target-sparsity", type=float, required=True, help="fraction of zeros, e.g. 0.5 or 0.8"
    )
    prune.add_argument(
        "--end-fraction",
        type=float,
        default=0.7,
        help="the target is reached after this fraction of the steps (default %(default)s)",
    )
    prune.add_argument(
        "--prune-depthwise", action="store_true", help="also prune the depthwise kernels"
    )
    _finetune_args(prune)
    prune.set_defaults(func=run_prune)

    ptq = jobs.add_parser("ptq", help="post-training conversion: float32/float16/dynamic/int8")
    _model_io(ptq, train_required=False)
    ptq.add_argument(
        "--mode",
        default="int8",
        choices=choices.PTQ_MODES,
        help="%(default)s",
    )
    ptq.add_argument(
        "--samples",
        type=int,
        default=100,
        help="representative utterances from --train for int8 (default %(default)s)",
    )
    ptq.set_defaults(func=run_ptq)

    report = jobs.add_parser("report", help="WER, size, MACs and speed of configurations")
    report.add_argument(
        "--configs", nargs="+", required=True, metavar="DIR", help="qn optimize outputs"
    )
    report.add_argument("--manifest", required=True, help="evaluation manifest (or TFRecords)")
    report.add_argument("--out", required=True, metavar="DIR", help="report folder")
    report.add_argument(
        "--threads", type=int, default=1, help="TFLite threads for the speed column (default 1)"
    )
    report.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "litert", "xnnpack", "builtin"),
        help="TFLite runtime for the WER and audio/s columns: LiteRT (fastest, int8 models "
        "2-3x faster than float32 on CPUs with VNNI), TensorFlow's TFLite with XNNPACK, or its "
        "built-in kernels (default %(default)s: LiteRT when installed)",
    )
    report.add_argument("--limit", type=int, help="evaluate only the first N utterances")
    report.add_argument(
        "--no-keras", action="store_true", help="skip the Keras (fake-quantized) evaluation"
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.set_defaults(func=run_report)


def _model_io(parser, train_required: bool):
    parser.add_argument("--model", required=True, metavar="DIR", help="float model folder")
    parser.add_argument(
        "--train", required=train_required, metavar="DATA", help="training data (or manifest)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--name", help="row name in the report (default from the job)")


def _finetune_args(parser):
    parser.add_argument("--val", metavar="DATA", help="validation data (WER/CER)")
    parser.add_argument(
        "--steps", type=int, default=1000, help="fine-tuning steps (default %(default)s)"
    )
    parser.add_argument("--config", help="training recipe YAML (batch size, optimizer, augment)")
    parser.add_argument("--lr", type=float, help="learning rate (overrides the recipe)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_model(path):
    from qn_cli.main import UserError
    from qn_keras.optimization.recipes import resolve_model_dir

    try:
        return resolve_model_dir(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_steps(args):
    from qn_cli.main import UserError

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {args.steps})")


def _done(job: str, path) -> int:
    from qn_keras.optimization.recipes import TFLITE_FILE, read_info

    info = read_info(path)
    print(f"qn optimize {job}: {info.get('name')} written to {path}")
    print(f"  TFLite: {path / TFLITE_FILE}")
    return 0


def _fine_tune(job, args, **options):
    """Runs a fine-tuning recipe (QAT or pruning) with the options both share; a diverged
    run is a user-facing error (lower --lr), not a traceback."""
    from qn_cli.main import UserError
    from qn_keras.training import TrainingDivergedError

    model = _check_model(args.model)
    try:
        return job(
            model,
            args.train,
            args.val,
            args.out,
            steps=args.steps,
            config=args.config,
            learning_rate=args.lr,
            name=args.name,
            progress=not args.no_progress,
            **options,
        )
    except TrainingDivergedError as e:
        raise UserError(str(e)) from None


def run_qat(args) -> int:
    from qn_keras.optimization.recipes import run_qat as job

    _check_steps(args)
    return _done("qat", _fine_tune(job, args, scheme=args.scheme))


def run_prune(args) -> int:
    from qn_cli.main import UserError
    from qn_keras.optimization.recipes import read_info
    from qn_keras.optimization.recipes import run_prune as job

    _check_steps(args)
    if not 0.0 < args.target_sparsity < 1.0:
        raise UserError(f"--target-sparsity must be in (0, 1) (got {args.target_sparsity})")
    if not 0.0 < args.end_fraction <= 1.0:
        raise UserError(f"--end-fraction must be in (0, 1] (got {args.end_fraction})")
    path = _fine_tune(
        job,
        args,
        target_sparsity=args.target_sparsity,
        end_fraction=args.end_fraction,
        include_depthwise=args.prune_depthwise,
    )
    info = read_info(path)
    print(f"  sparsity of the pruned layers: {info['pruned_sparsity']:.1%}")
    for row in info["layer_sparsity"]:
        mark = "" if row["pruned"] else " (not pruned)"
        print(f"    {row['layer']:<32} {row['sparsity']:6.1%} of {row['weights']:>9,}{mark}")
    if info.get("val"):
        print(f"  val WER {info['val']['wer']:.2%}, CER {info['val']['cer']:.2%}")
    return _done("prune", path)


def run_ptq(args) -> int:
    from qn_cli.main import UserError
    from qn_keras.optimization.recipes import run_ptq as job

    if args.mode == "int8" and not args.train:
        raise UserError("--mode int8 needs --train DATA for the representative dataset")
    model = _check_model(args.model)
    path = job(
        model,
        args.out,
        mode=args.mode,
        representative_data=args.train,
        samples=args.samples,
        name=args.name,
    )
    return _done("ptq", path)


def run_report(args) -> int:
    from qn_cli.main import UserError
    from qn_keras.optimization.report import PLOT_MACS, PLOT_MEMORY, REPORT_MD, run_report

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1 (got {args.threads})")
    for path in args.configs:
        _check_model(path)
    doc = run_report(
        args.configs,
        args.manifest,
        args.out,
        threads=args.threads,
        engine=args.engine,
        keras=not args.no_keras,
        limit=args.limit,
        progress=not args.no_progress,
    )
    from qn_keras.optimization.report import markdown_table

    print(markdown_table(doc["rows"]))
    print(f"qn optimize report: {args.out}/{REPORT_MD}, {PLOT_MEMORY}, {PLOT_MACS}")
    return 0
