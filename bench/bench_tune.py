"""Architecture-search benchmark: a bounded `qn tune` search, then the baseline preset trained
with the same recipe for the same minutes per trial, side by side in one JSON.

    .venv/bin/python bench/bench_tune.py --train ../shared/data/speech-mini/train.json \
        --val ../shared/data/speech-mini/dev.json --out runs/bench_tune --time-budget 25m

Writes OUT/leaderboard.{json,md}, OUT/pareto.png, OUT/best_model/ (from `qn tune`),
OUT/baseline/ (the preset's training run) and OUT/bench_tune.json (the comparison).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default=str(REPO / "bench" / "tune_speech_mini.yaml"))
    parser.add_argument("--time-budget", default="25m")
    parser.add_argument("--max-trials", type=int)
    parser.add_argument("--baseline", default="quartznet_5x5", help="preset, or 'none'")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from qn_keras.presets import build_model
    from qn_keras.training import data as data_lib
    from qn_keras.training.config import TrainConfig
    from qn_keras.training.trainer import Trainer
    from qn_keras.tuning.config import load_tune_config
    from qn_keras.tuning.probe import probe_model
    from qn_keras.tuning.search import run_search

    search = {"time_budget": args.time_budget}
    if args.max_trials:
        search["max_trials"] = args.max_trials
    config = load_tune_config(args.config, {"search": search})
    out = Path(args.out)
    started = time.monotonic()
    summary = run_search(config, args.train, args.val, out, progress=False)
    search_seconds = time.monotonic() - started
    rows = summary.pop("rows")
    best = next((r for r in rows if r["rank"] == 1), None)
    result = {
        "config": config.to_dict(),
        "search": {k: v for k, v in summary.items() if k != "role"},
        "search_wall_seconds": search_seconds,
        "best": best,
        "baseline": None,
    }

    if args.baseline != "none":
        # Same recipe and minutes as one trial, data from the search's feature cache.
        train_config = config.train.to_dict()
        train_config["model"] = {"preset": args.baseline}
        train_config = TrainConfig.from_dict(train_config)
        tokenizer, featurizer = train_config.tokenizer(), train_config.featurizer_config()
        cache = out / "cache" / "tuner0"
        train = data_lib.open_data(
            args.train, tokenizer, featurizer, cache, max_duration=train_config.data.max_duration
        )
        val = data_lib.open_data(args.val, tokenizer, featurizer, cache)
        probe = probe_model(
            build_model(args.baseline),
            config.constraints.probe_seconds,
            config.constraints.probe_repeats,
        )
        t0 = time.monotonic()
        run = Trainer(
            train_config, out / "baseline", train, val, progress=False, export_serving=False
        ).fit()
        best_val = run.best or run.final or {}
        result["baseline"] = {
            "preset": args.baseline,
            **probe.to_dict(),
            "val_wer": best_val.get("wer"),
            "val_cer": best_val.get("cer"),
            "val_loss": best_val.get("loss"),
            "steps": run.steps,
            "train_seconds": time.monotonic() - t0,
        }
    path = out / "bench_tune.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({"best": best, "baseline": result["baseline"]}, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
