"""`qn lm build` and `qn lm tune`: n-gram language models for beam-search decoding.

    qn lm build --text corpus.txt --order 4 --out lms/en-4
    qn lm tune --model runs/x/model --manifest dev.json --lm lms/en-4 \\
        --alpha 0:2:0.25 --beta 0:3:0.5
    qn transcribe --model runs/x/model --lm lms/en-4 clip.wav

build: text files (one sentence a line, .gz fine) or NeMo manifests (their "text"),
normalized like transcripts (the labels' rules; other characters dropped and counted), to a
modified Kneser-Ney LM by KenLM's lmplz (ARPA and KenLM binary) with the decoder's word list.
tune: runs the model over the dev set once, decodes the alpha x beta grid in parallel on all
cores, and writes tuning.csv, tuning.png and the best setting (decoder.json) into the LM
folder; --lm DIR then uses that setting unless --alpha/--beta/--beam say otherwise.
"""

from __future__ import annotations

import argparse


def register(subparsers):
    parser = subparsers.add_parser(
        "lm",
        help="build and tune n-gram language models",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="lm_command", metavar="ACTION")
    sub.required = True

    build = sub.add_parser("build", help="estimate an n-gram LM from text (KenLM lmplz)")
    build.add_argument("--text", required=True, nargs="+", metavar="FILE", help="LM text")
    build.add_argument("--order", type=int, default=4, help="n-gram order (default 4)")
    build.add_argument("--out", required=True, metavar="DIR", help="LM folder to write")
    build.add_argument(
        "--prune",
        type=int,
        nargs="+",
        metavar="N",
        help="drop n-grams seen N times or fewer, one threshold per order from bigrams up "
        "(e.g. --prune 0 1 1 for a 4-gram)",
    )
    build.add_argument("--labels", metavar="FILE", help="label set file (default: NeMo English)")
    build.add_argument(
        "--binary-type", choices=("trie", "probing"), default="trie", help="KenLM binary format"
    )
    build.add_argument("--no-binary", action="store_true", help="ARPA file only")
    build.add_argument("--memory", default="20%", help="lmplz sort memory (default 20%%)")
    build.add_argument("--overwrite", action="store_true")
    build.set_defaults(func=run_build)

    tune = sub.add_parser("tune", help="grid-search alpha and beta on a dev set")
    tune.add_argument("--model", required=True, metavar="DIR", help="model folder")
    tune.add_argument(
        "--manifest", required=True, metavar="PATH", help="dev manifest or `qn features` folder"
    )
    tune.add_argument("--lm", required=True, metavar="DIR", help="LM folder (qn lm build)")
    tune.add_argument("--alpha", default="0:2:0.25", help="A:B:STEP or A,B,... (0:2:0.25)")
    tune.add_argument("--beta", default="0:3:0.5", help="A:B:STEP or A,B,... (0:3:0.5)")
    tune.add_argument("--beam", type=int, default=None, help="beam width (default 24)")
    tune.add_argument("--beam-prune", type=float, default=None, metavar="LOGP")
    tune.add_argument("--processes", type=int, default=None, help="default: one per core")
    tune.add_argument("--batch-size", type=int, default=16)
    tune.add_argument("--no-progress", action="store_true")
    tune.set_defaults(func=run_tune)


def run_build(args) -> int:
    import sys

    from qn_keras.lm.build import build_lm
    from qn_keras.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_file(args.labels) if args.labels else CharTokenizer()
    metadata = build_lm(
        args.text,
        args.out,
        order=args.order,
        prune=args.prune,
        tokenizer=tokenizer,
        binary=not args.no_binary,
        binary_type=args.binary_type,
        memory=args.memory,
        overwrite=args.overwrite,
        log=lambda message: print(f"qn lm build: {message}", file=sys.stderr),
    )
    counts = ", ".join(f"{n}-grams {c:,}" for n, c in sorted(metadata["ngrams"].items()))
    seconds = metadata["seconds"]
    total = sum(v for v in seconds.values() if v)
    size = sum(metadata["bytes"].values()) / 1e6
    print(f"{args.out}: order {metadata['order']}, {counts}")
    print(f"  {metadata['text']['words']:,} words in {total:.1f} s; folder {size:.1f} MB")
    return 0


def run_tune(args) -> int:
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from qn_cli.main import UserError
    from qn_keras.lm.decoder import DecoderSettings
    from qn_keras.lm.folder import load_lm_folder
    from qn_keras.lm.tune import TuneResult, best_row, parse_grid, tune_grid, write_results

    alphas = parse_grid(args.alpha, "alpha")
    betas = parse_grid(args.beta, "beta")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    folder = load_lm_folder(args.lm)  # a bad LM folder is reported before the model runs
    settings = DecoderSettings().replace(
        beam_width=args.beam,
        beam_prune_logp=args.beam_prune,
    )

    from qn_keras.model_dir import load_model_dir
    from qn_keras.training.evaluation import evaluate, evaluation_dataset

    bundle = load_model_dir(args.model)
    folder.check_labels(bundle.tokenizer.labels)
    if not Path(args.manifest).exists():
        raise UserError(f"--manifest not found: {args.manifest}")
    dataset, total = evaluation_dataset(args.manifest, bundle, args.batch_size)
    with tqdm(total=total, unit="utt", desc="log-probs", disable=args.no_progress) as bar:
        greedy = evaluate(bundle.model, dataset, bundle.tokenizer, keep_logprobs=True, progress=bar)
    for bad in greedy.rejected:
        print(f"qn lm tune: not used: {bad['utt_id']}: {bad['error']}", file=sys.stderr)
    references = [row["reference"] for row in greedy.utterances]
    cells = len(alphas) * len(betas)
    with tqdm(total=cells, unit="cell", desc="grid", disable=args.no_progress) as bar:
        rows = tune_grid(
            greedy.logprobs,
            references,
            bundle.tokenizer.labels,
            args.lm,
            alphas,
            betas,
            settings=settings,
            processes=args.processes,
            progress=lambda row: bar.update(1),
        )
    from qn_keras.inference import model_stride

    frame_seconds = model_stride(bundle.model) * bundle.featurizer.hop_length
    frame_seconds /= bundle.featurizer.sample_rate
    audio = sum(len(lp) for lp in greedy.logprobs) * frame_seconds
    result = TuneResult(
        rows=rows,
        best=best_row(rows),
        greedy={"wer": greedy.wer, "cer": greedy.cer},
        utterances=greedy.num_utterances,
        audio_seconds=audio,
    )
    source = {"model": str(args.model), "manifest": str(args.manifest)}
    decoder = write_results(args.lm, result, settings, source)
    best = result.best
    print(f"greedy: WER {greedy.wer:.2%}, CER {greedy.cer:.2%} ({greedy.num_utterances} utts)")
    print(
        f"best: alpha {best['alpha']:g}, beta {best['beta']:g}, beam {decoder['beam_width']}: "
        f"WER {best['wer']:.2%}, CER {best['cer']:.2%}"
    )
    print(f"wrote {Path(args.lm) / 'decoder.json'}, tuning.csv, tuning.png")
    return 0
