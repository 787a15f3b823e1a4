"""A whole architecture search: data, tuner, search, leaderboard, plot and best model.

Output folder::

    OUT/
      tune_config.json    the resolved config (a resumed search must keep space and tuner)
      search/             the Keras Tuner project: oracle.json, trial_<id>/{trial.json,
                          qn_trial.json, train/}
      cache/<tuner id>/   manifests featurized once, reused by every trial
      leaderboard.json    summary + one row per trial, best first
      leaderboard.md      the same as a table
      pareto.png          validation WER vs parameters and vs CPU latency, Pareto fronts marked
      best_model/         the best trial's model folder, with its serving SavedModel

Distributed search (Keras Tuner's own protocol): every machine runs the same command with a
shared OUT; ``KERASTUNER_TUNER_ID=chief`` on one (it runs the oracle and writes the results
when the search ends; it trains nothing), ``tuner0``, ``tuner1``, ... on the workers, and
``KERASTUNER_ORACLE_IP`` / ``KERASTUNER_ORACLE_PORT`` everywhere naming the chief's address.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from qn_keras import files
from qn_keras.training.config import ConfigError
from qn_keras.tuning import leaderboard
from qn_keras.tuning.config import TuneConfig
from qn_keras.tuning.tuner import QuartzNetTuner, make_oracle, read_trial_record

PROJECT = "search"
CONFIG_FILE = "tune_config.json"
BEST_DIR = "best_model"
PLOT_FILE = "pareto.png"
# Settings a resumed search may change: how long it runs and what it may train.
RESUMABLE_KEYS = {"search": ("max_trials", "time_budget"), "constraints": None}


def role() -> str:
    """``single``, ``chief`` or ``worker``, as Keras Tuner reads its environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [
        k for k in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(k)
    ]
    if missing:
        raise ConfigError(
            f"KERASTUNER_ORACLE_IP is set but {', '.join(missing)} is not: set all three "
            "(see the README's Architecture search section)."
        )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _comparable(config: dict) -> dict:
    view = json.loads(json.dumps(config))
    for section, keys in RESUMABLE_KEYS.items():
        if keys is None:
            view.pop(section, None)
        else:
            for key in keys:
                view.get(section, {}).pop(key, None)
    return view


def _check_resume(out: Path, config: TuneConfig, overwrite: bool):
    path = out / CONFIG_FILE
    project = out / PROJECT
    if overwrite or not project.exists():
        return
    if not path.is_file():
        raise ConfigError(
            f"{project} exists but {path} is missing; use a new --out or --overwrite."
        )
    saved = json.loads(path.read_text())
    if _comparable(saved) != _comparable(config.to_dict()):
        raise ConfigError(
            f"{out} holds a search with a different space, tuner or training recipe; resume it "
            "with the same config (only max_trials, time_budget and constraints may change), "
            "use a new --out, or pass --overwrite."
        )


def _wait_for_chief(out: Path, timeout_s: float = 600.0, poll_s: float = 0.5):
    import time

    deadline = time.monotonic() + timeout_s
    while not (out / CONFIG_FILE).is_file():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"No {CONFIG_FILE} from the chief in {out} after {timeout_s:.0f} s: start the "
                "chief (KERASTUNER_TUNER_ID=chief) with the same --out, on a folder every "
                "machine shares."
            )
        time.sleep(poll_s)


def _remove_results(out: Path):
    import shutil

    for name in (PROJECT, BEST_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("leaderboard.json", "leaderboard.md", PLOT_FILE):
        (out / name).unlink(missing_ok=True)


def _write_config(out: Path, config: TuneConfig):
    files.write_json(out / CONFIG_FILE, config.to_dict())


def collect_rows(tuner) -> list[dict]:
    """One leaderboard row per trial the oracle knows, from Keras Tuner's trial state and the
    trial's ``qn_trial.json``."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        record = read_trial_record(tuner.get_trial_dir(trial_id))
        status = str(trial.status).upper()
        row = {
            "trial_id": trial_id,
            "hyperparameters": tuner.trial_values(trial),
            "architecture": record.get("architecture"),
            "epochs": record.get("epochs"),
        }
        for key in ("params", "macs_per_second", "speed", "latency_ms"):
            value = record.get(key)
            row[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        for key in ("val_wer", "val_cer", "val_loss", "train_seconds", "reason", "steps"):
            if key in record:
                row[key] = record[key]
        if status == "COMPLETED":
            row["status"] = record.get("status", "completed")  # or infeasible, diverged
        elif status in ("FAILED", "INVALID"):
            row["status"] = "failed"
            lines = (trial.message or "").strip().splitlines()
            row["reason"] = lines[-1] if lines else None
        else:
            row["status"] = "running"
        if row["status"] == "completed" and record.get("model_dir"):
            row["model_dir"] = str(Path(tuner.get_trial_dir(trial_id)) / record["model_dir"])
        score = trial.score
        row["score"] = None if score is None or not math.isfinite(score) else float(score)
        rows.append(row)
    return rows


def export_best(best: dict, out: Path, summary: dict) -> Path:
    """Writes the best trial's model as ``OUT/best_model`` (model folder with the serving
    SavedModel), unless that exact trial is there already."""
    from qn_keras.model_dir import is_model_dir, load_model_dir, save_model_dir

    target = out / BEST_DIR
    if is_model_dir(target):
        meta = json.loads((target / "qn_model.json").read_text())
        if meta.get("metadata", {}).get("tuning", {}).get("trial_id") == best["trial_id"]:
            return target
    bundle = load_model_dir(best["model_dir"])
    bundle.metadata = {
        **bundle.metadata,
        "trained_by": "qn tune",
        "tuning": {
            "trial_id": best["trial_id"],
            "hyperparameters": best["hyperparameters"],
            "architecture": best.get("architecture"),
            "val_wer": best.get("val_wer"),
            "val_loss": best.get("val_loss"),
            "params": best.get("params"),
            "objective": summary["objective"],
        },
    }
    return save_model_dir(target, bundle, serving=True)


def write_results(tuner, config: TuneConfig, out: Path, data: dict | None = None) -> dict:
    """Leaderboard (JSON and Markdown), Pareto plot and best model; returns the summary."""
    objective = config.search.objective
    rows = leaderboard.rank_rows(collect_rows(tuner), objective)
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    best = next((r for r in rows if r["status"] == "completed" and r.get("model_dir")), None)
    oracle = tuner.oracle
    summary = {
        "tuner": config.search.tuner,
        "objective": objective,
        "max_trials": config.search.max_trials,
        "time_budget_s": config.search.time_budget_seconds,
        "elapsed_seconds": oracle.elapsed_seconds() if hasattr(oracle, "elapsed_seconds") else None,
        "budget_exhausted": bool(getattr(oracle, "budget_exhausted", False)),
        "counts": counts,
        "constraints": {
            "max_params": config.constraints.max_params,
            "min_speed": config.constraints.min_speed,
            "infeasible_score": config.search.penalty,
        },
        "data": data or {},
        "best_trial_id": best["trial_id"] if best else None,
        "best_model_dir": None,
    }
    if best is not None:
        summary["best_model_dir"] = str(export_best(best, out, summary))
    leaderboard.write_json(out / "leaderboard.json", rows, summary)
    leaderboard.write_markdown(out / "leaderboard.md", rows, summary)
    title = f"{config.search.tuner} search on {objective}: " + ", ".join(
        f"{n} {status}" for status, n in counts.items()
    )
    summary["plot"] = (
        str(out / PLOT_FILE) if leaderboard.write_plot(out / PLOT_FILE, rows, title) else None
    )
    summary["rows"] = rows
    return summary


def run_search(
    config: TuneConfig,
    train,
    val,
    out_dir,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Runs (or resumes) a search and writes its results; returns the summary (for a worker,
    only ``{"role": "worker"}``: the chief writes the results)."""
    import tensorflow as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    this_role = role()
    if this_role != "worker":
        _check_resume(out, config, overwrite)
        if overwrite:
            _remove_results(out)
        _write_config(out, config)
    else:
        # Workers start at the same time as the chief; building the tuner creates the project
        # folder, which the chief would then take for a broken earlier search. So a worker
        # waits until the chief has checked the folder and written the config.
        _wait_for_chief(out)
    tokenizer = config.train.tokenizer()
    featurizer = config.train.featurizer_config()
    tuner = QuartzNetTuner(
        make_oracle(config),
        config,
        vocabulary_size=tokenizer.vocabulary_size,
        num_features=featurizer.num_mels,
        directory=str(out),
        project_name=PROJECT,
        overwrite=False,
        progress=progress,
        cache_dir=str(out / "cache" / os.environ.get("KERASTUNER_TUNER_ID", "tuner0")),
    )
    if this_role == "chief":
        tuner.search(None, None)  # serves the oracle until every worker is done
    else:
        tuner.search(train, val)
    data = {}
    for name, source in zip(("train", "val"), tuner.sources or (), strict=False):
        data[name] = {
            "source": source.description,
            "utterances": source.num_utterances,
            "hours": source.hours,
        }
    tf.keras.backend.clear_session()
    if this_role == "worker":
        return {"role": "worker", "tuner_id": tuner.tuner_id}
    summary = write_results(tuner, config, out, data)
    summary["role"] = this_role
    return summary
