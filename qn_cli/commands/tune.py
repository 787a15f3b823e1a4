"""`qn tune`: architecture search over QuartzNet blocks, repeats, groups, width and kernels."""

from __future__ import annotations

TUNER_CHOICES = ("hyperband", "bayesian", "random")


def register(subparsers):
    parser = subparsers.add_parser(
        "tune",
        help="search QuartzNet architectures with Keras Tuner",
        description=(
            "Searches blocks, repeats, pointwise groups, width, kernel size, dropout and learning "
            "rate with Keras Tuner, training each trial with the `qn train` recipe. Writes "
            "leaderboard.json/.md, pareto.png and best_model/ to --out. Run the same command "
            "again to resume a killed search. For several machines set KERASTUNER_TUNER_ID, "
            "KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT (see the README)."
        ),
    )
    parser.add_argument(
        "--config",
        help="tune config YAML (default: the built-in defaults, as in configs/tune_default.yaml)",
    )
    parser.add_argument("--train", required=True, help="training data: manifest or TFRecord folder")
    parser.add_argument("--val", required=True, help="validation data: manifest or TFRecord folder")
    parser.add_argument("--out", required=True, help="output folder (shared by all machines)")
    parser.add_argument("--tuner", choices=TUNER_CHOICES, help="overrides search.tuner")
    parser.add_argument(
        "--objective", choices=("val_wer", "val_loss"), help="overrides search.objective"
    )
    parser.add_argument("--max-trials", type=int, help="overrides search.max_trials")
    parser.add_argument(
        "--time-budget",
        help="no new trial after this long, e.g. 2h, 45m, 1h30m (search.time_budget)",
    )
    parser.add_argument(
        "--max-params", type=int, help="prune, untrained, models with more trainable parameters"
    )
    parser.add_argument(
        "--min-speed",
        type=float,
        help="prune, untrained, models slower than this many seconds of audio per CPU second",
    )
    parser.add_argument("--seed", type=int, help="overrides search.seed")
    parser.add_argument(
        "--overwrite", action="store_true", help="discard an existing search in --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no training progress bars")
    parser.set_defaults(func=run)


def _overrides(args) -> dict:
    out = {"search": {}, "constraints": {}}
    for flag, section, key in (
        ("tuner", "search", "tuner"),
        ("objective", "search", "objective"),
        ("max_trials", "search", "max_trials"),
        ("time_budget", "search", "time_budget"),
        ("seed", "search", "seed"),
        ("max_params", "constraints", "max_params"),
        ("min_speed", "constraints", "min_speed"),
    ):
        value = getattr(args, flag)
        if value is not None:
            out[section][key] = value
    return out


def run(args) -> int:
    from pathlib import Path

    from qn_cli.main import UserError

    for flag in ("train", "val"):
        if not Path(getattr(args, flag)).exists():
            raise UserError(
                f"--{flag} {getattr(args, flag)} not found (a manifest or a TFRecord folder)."
            )
    from qn_keras.tuning.config import load_tune_config
    from qn_keras.tuning.search import run_search

    config = load_tune_config(args.config, _overrides(args))

    summary = run_search(
        config, args.train, args.val, args.out, overwrite=args.overwrite, progress=not args.quiet
    )
    if summary.get("role") == "worker":
        print(f"Worker {summary['tuner_id']} done; the chief writes the leaderboard.")
        return 0
    _print_summary(summary, Path(args.out))
    return 0


def _print_summary(summary: dict, out) -> None:
    rows = summary["rows"]
    elapsed = summary.get("elapsed_seconds")
    print(
        f"\n{summary['tuner']} search on {summary['objective']}: {summary['counts']}"
        + (f", {elapsed / 60:.1f} min" if elapsed else "")
        + (" (time budget reached)" if summary.get("budget_exhausted") else "")
    )
    print(f"{'trial':>6} {'architecture':<22} {'params':>11} {'speed':>8} {'val WER':>8}  status")
    for row in rows[:10]:
        wer = row.get("val_wer")
        speed = row.get("speed")
        print(
            f"{row['trial_id']:>6} {str(row.get('architecture')):<22} "
            f"{row.get('params') or 0:>11,} "
            f"{(f'{speed:.1f}x' if isinstance(speed, float) else '-'):>8} "
            f"{(f'{wer:.2%}' if isinstance(wer, float) else '-'):>8}  {row['status']}"
        )
    print(f"Leaderboard: {out / 'leaderboard.md'} (and .json)")
    if summary.get("plot"):
        print(f"Pareto plot: {summary['plot']}")
    if summary.get("best_model_dir"):
        print(
            f"Best model (trial {summary['best_trial_id']}): {summary['best_model_dir']} "
            "(model folder with serving SavedModel)"
        )
        print(
            f"  for TF Serving: qn export --model {summary['best_model_dir']} --out exports "
            "--name NAME"
        )
    else:
        print("No trial finished training, so there is no best model yet.")
