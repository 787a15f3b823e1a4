"""Accuracy of a model folder on the project's evaluation sets, overall and per voice.

The accuracy issue's benchmark: speech-mini dev (3 synthetic voices no training corpus uses),
asterisk-dev (real recorded speech, one speaker) and sample_data dev, greedy and (``--lm``)
with the n-gram LM, per voice or speaker (`qn evaluate --group-by`). Runs the `qn` CLI as a
user would; writes one JSON (``--out``) and prints the Markdown rows BENCHMARKS.md uses.

    .venv/bin/python bench/bench_accuracy.py --model runs/big/model --lm runs/bench_lm/mini/lm-3 \\
        --out bench/results/accuracy_big.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QN = REPO / ".venv" / "bin" / "qn"
SHARED = REPO.parent / "shared" / "data"
# (name, manifest, the manifest field naming the voice or speaker)
SETS = [
    ("speech-mini dev", SHARED / "speech-mini" / "dev.json", "source"),
    ("asterisk-dev", SHARED / "asterisk-dev" / "dev.json", "source"),
    ("sample_data dev", REPO / "sample_data" / "dev.json", "speaker"),
]


def evaluate(model: Path, manifest: Path, field: str, lm: Path | None, work: Path) -> dict:
    """Overall and per-group WER/CER from `qn evaluate --group-by`'s per-utterance lines."""
    sys.path.insert(0, str(REPO))
    from qn_cli.commands.evaluate import group_scores

    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{manifest.parent.name}_{'lm' if lm else 'greedy'}.jsonl"
    cmd = [str(QN), "evaluate", "--model", str(model), "--manifest", str(manifest)]
    cmd += ["--group-by", field, "--output", str(out), "--no-progress"]
    cmd += ["--lm", str(lm)] if lm else []
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "error" not in r]
    overall = group_scores(rows, {})["(none)"]
    groups = {r["utt_id"]: r[field] for r in rows}
    return {**overall, "groups": group_scores(rows, groups)}


def _pair(scores: dict) -> str:
    return f"{scores['wer']:.1%} / {scores['cer']:.1%}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder")
    parser.add_argument("--lm", type=Path, help="an LM folder (qn lm build) for the LM columns")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument(
        "--work", type=Path, help="per-utterance outputs (default: runs/accuracy_<--out stem>)"
    )
    args = parser.parse_args(argv)
    work = args.work or REPO / "runs" / f"accuracy_{args.out.stem}"
    report = {"model": str(args.model), "lm": str(args.lm) if args.lm else None, "sets": {}}
    for name, manifest, field in SETS:
        entry = {"greedy": evaluate(args.model, manifest, field, None, work)}
        if args.lm:
            entry["lm"] = evaluate(args.model, manifest, field, args.lm, work)
        report["sets"][name] = entry
        print(json.dumps({name: {k: (v["wer"], v["cer"]) for k, v in entry.items()}}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| set | voice | utts | greedy WER / CER | with LM WER / CER |")
    print("|---|---|---:|---:|---:|")
    for name, entry in report["sets"].items():
        greedy, lm = entry["greedy"], entry.get("lm")
        rows = [("**all**", greedy, lm)]
        rows += [(g, s, lm["groups"][g] if lm else None) for g, s in greedy["groups"].items()]
        for label, g, with_lm_scores in rows:
            with_lm = _pair(with_lm_scores) if with_lm_scores else "-"
            print(f"| {name} | {label} | {g['utterances']} | {_pair(g)} | {with_lm} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
