"""`qn evaluate`: WER and CER of a model folder on a manifest, with per-utterance results.

    qn evaluate --model runs/x/model --manifest dev.json --output results.jsonl

Greedy decoding, or beam search with an n-gram LM (--lm DIR, from `qn lm build`; its tuned
alpha/beta unless given). Transcripts are normalized with the model's tokenizer before scoring. The
per-utterance JSON lines (reference, hypothesis, word and character errors) are written worst
first. --group-by FIELD adds WER/CER per value of a manifest field (per voice or speaker:
`source`, `speaker`; a LibriSpeech folder groups by speaker). Utterances that cannot be scored (non-finite features, damaged records, label ids
outside the model's vocabulary) are reported by id, not scored: they are listed on stderr and
in the output with an "error" field instead of a hypothesis.
"""

from __future__ import annotations

import argparse

from qn_cli import lm_options

# What each per-utterance result line holds; --group-by adds one more field.
RESULT_FIELDS = {
    "utt_id", "reference", "hypothesis", "word_errors", "words", "wer", "char_errors", "chars",
    "cer", "loss", "error",
}  # fmt: skip


def register(subparsers):
    parser = subparsers.add_parser(
        "evaluate",
        help="WER/CER of a model on a manifest",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder")
    parser.add_argument(
        "--manifest",
        required=True,
        metavar="PATH",
        help="manifest (.json/.csv/.tsv, LibriSpeech folder) or a `qn features` folder",
    )
    parser.add_argument("--output", metavar="FILE", help="per-utterance results (JSON lines)")
    parser.add_argument(
        "--group-by",
        metavar="FIELD",
        help="also score per value of this manifest field (e.g. source, speaker)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-progress", action="store_true")
    lm_options.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from qn_cli.main import UserError
    from qn_keras import files
    from qn_keras.model_dir import load_model_dir
    from qn_keras.training.evaluation import evaluate, evaluation_dataset

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    bundle = load_model_dir(args.model)
    if not Path(args.manifest).exists():
        raise UserError(f"--manifest not found: {args.manifest}")
    groups = None
    if args.group_by in RESULT_FIELDS:
        raise UserError(
            f"--group-by {args.group_by} would overwrite that field of the per-utterance "
            f"results ({', '.join(sorted(RESULT_FIELDS))}); name another manifest field"
        )
    if args.group_by:
        from qn_keras.data.manifest import utterance_groups

        groups = utterance_groups(args.manifest, args.group_by)
    decoder = lm_options.decoder_from_args(args, bundle.tokenizer.labels)
    dataset, total = evaluation_dataset(args.manifest, bundle, args.batch_size)
    with tqdm(total=total, unit="utt", desc="evaluating", disable=args.no_progress) as bar:
        result = evaluate(bundle.model, dataset, bundle.tokenizer, decoder=decoder, progress=bar)
    rows = sorted(result.utterances, key=lambda r: (-r["word_errors"], -r["cer"], r["utt_id"]))
    rows += result.rejected
    for bad in result.rejected:
        print(f"qn evaluate: not scored: {bad['utt_id']}: {bad['error']}", file=sys.stderr)
    print(f"utterances: {result.num_utterances}")
    if result.rejected:
        print(f"rejected: {len(result.rejected)} (not scored; see above)")
    print(f"WER: {result.wer:.2%}")
    print(f"CER: {result.cer:.2%}")
    if groups is not None:
        for row in rows:
            row[args.group_by] = groups.get(row["utt_id"], "(none)")
        print_groups(group_scores(result.utterances, groups), args.group_by)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_json_lines(out, rows)
        print(f"per-utterance results (worst first): {out}")
    return 0


def group_scores(rows, groups: dict) -> dict:
    """``{group: {utterances, wer, cer}}`` from per-utterance rows, errors summed per group."""
    sums = {}
    for row in rows:
        g = sums.setdefault(groups.get(row["utt_id"], "(none)"), [0, 0, 0, 0, 0])
        g[0] += 1
        g[1] += row["word_errors"]
        g[2] += row["words"]
        g[3] += row["char_errors"]
        g[4] += row["chars"]
    return {
        name: {"utterances": n, "wer": we / max(wn, 1), "cer": ce / max(cn, 1)}
        for name, (n, we, wn, ce, cn) in sorted(sums.items())
    }


def print_groups(scores: dict, field: str) -> None:
    width = max([len(field), *map(len, scores)])
    print(f"{field:<{width}}  {'utts':>5}  {'WER':>7}  {'CER':>7}")
    for name, s in scores.items():
        print(f"{name:<{width}}  {s['utterances']:>5}  {s['wer']:>7.2%}  {s['cer']:>7.2%}")
