"""Fine-tuning a trained model on a few minutes of one's own recordings, before and after.

The workflow of a user with a model trained here and a handful of their own recordings: split
the recordings in two (here ``asterisk-dev``: real speech, one speaker, 376 prompts; every
other prompt in each half, so both halves cover the whole vocabulary range alike), fine-tune
with ``qn train --init MODEL`` on one half, and compare WER/CER on the other half before and
after, greedy and (with ``--lm``) with the n-gram LM. Commands run as a user runs them (the
`qn` CLI in subprocesses); the halves and the run go under ``--work`` (git-ignored ``runs/``).

    .venv/bin/python bench/bench_finetune.py --init runs/mini_multi_wide/model \
        --config bench/finetune_asterisk.yaml --max-minutes 12 [--lm runs/bench_lm/mini]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QN = REPO / ".venv" / "bin" / "qn"
DEFAULT_MANIFEST = REPO.parent / "shared" / "data" / "asterisk-dev" / "dev.json"


def split(manifest: Path, out_dir: Path) -> tuple[Path, Path]:
    """Alternate lines of ``manifest`` into two manifests with absolute audio paths."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for row in rows:
        row["audio_filepath"] = str((manifest.parent / row["audio_filepath"]).resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    halves = []
    for name, part in (("a", rows[0::2]), ("b", rows[1::2])):
        path = out_dir / f"asterisk_half_{name}.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        halves.append(path)
    return halves[0], halves[1]


def evaluate(model: Path, manifest: Path, lm: Path | None) -> dict:
    """``qn evaluate`` greedy (and with the LM): WER/CER from its --output lines."""
    out = {}
    for label, extra in (("greedy", []), ("lm", ["--lm", str(lm)] if lm else None)):
        if extra is None:
            continue
        results = manifest.parent / f"eval_{model.parent.name}_{label}.jsonl"
        cmd = [str(QN), "evaluate", "--model", str(model), "--manifest", str(manifest)]
        cmd += ["--output", str(results), "--no-progress", *extra]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
        out[label] = _scores(results)
    return out


def _scores(results: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from qn_keras.metrics import cer, wer

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "error" not in r]
    refs = [r["reference"] for r in rows]
    hyps = [r["hypothesis"] for r in rows]
    return {"utterances": len(rows), "wer": wer(refs, hyps), "cer": cer(refs, hyps)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="the trained model folder")
    parser.add_argument("--config", type=Path, default=REPO / "bench" / "finetune_asterisk.yaml")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "finetune_asterisk")
    parser.add_argument("--max-minutes", type=float, default=12.0)
    parser.add_argument("--lm", type=Path, help="an LM folder (qn lm build) for the LM rows")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "finetune.json")
    args = parser.parse_args(argv)
    train, held_out = split(args.manifest, args.work)
    report = {"init": str(args.init), "train": str(train), "held_out": str(held_out)}
    report["before"] = evaluate(args.init, held_out, args.lm)
    print(json.dumps({"before": report["before"]}), flush=True)
    run_dir = args.work / "run"
    cmd = [str(QN), "train", "--config", str(args.config), "--init", str(args.init)]
    # No --val: choosing the checkpoint on the held-out half would score the selection too.
    cmd += ["--train", str(train), "--out", str(run_dir)]
    cmd += ["--max-minutes", str(args.max_minutes), "--no-progress"]
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"qn train failed:\n{run.stderr[-3000:]}")
    report["train_minutes"] = (time.monotonic() - start) / 60
    training = json.loads((run_dir / "training_report.json").read_text())
    report["steps"] = training.get("steps")
    report["best"] = training.get("best")
    report["after"] = evaluate(run_dir / "model", held_out, args.lm)
    print(json.dumps({"after": report["after"], "minutes": report["train_minutes"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
