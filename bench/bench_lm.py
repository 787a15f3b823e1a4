"""Language-model decoding benchmarks (not timed tests). Results go to BENCHMARKS.md by hand.

Accuracy and decoding cost: n-gram LMs of several orders from one text, each tuned on the dev
set (`qn lm tune`'s grid, in parallel), against greedy decoding and beam search without an LM
(the same search, alpha = beta = 0 and no LM), WER/CER overall and per speaker, decoding time
per second of audio; then `qn transcribe`'s wall time with and without `--lm`, interleaved,
median of --repeat runs::

    python bench/bench_lm.py accuracy --model runs/x/model \\
        --manifest ../shared/data/speech-mini/dev.json \\
        --text ../shared/data/lm-text/fortunes.txt --orders 3 4 5 --out runs/bench_lm/mini

Build speed: `qn lm build` on N million words (the text repeated, and a bigram-chain text
sampled from it with as many distinct n-grams as real text would have)::

    python bench/bench_lm.py build --text ../shared/data/lm-text/fortunes.txt --words 10000000

Both print one JSON object (and a Markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _qn(*args) -> list[str]:
    return [sys.executable, "-m", "qn_cli", *map(str, args)]


def _build(text, out, order, prune=None) -> dict:
    command = _qn("lm", "build", "--text", text, "--order", order, "--out", out, "--overwrite")
    if prune:
        command += ["--prune", *map(str, prune)]
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    meta = json.loads((Path(out) / "lm.json").read_text())
    return {
        "order": order,
        "prune": meta["prune"],
        "words": meta["text"]["words"],
        "ngrams": meta["ngrams"],
        "wall_s": round(seconds, 2),
        "stage_s": meta["seconds"],
        "megabytes": {k: round(v / 1e6, 2) for k, v in meta["bytes"].items()},
        "peak_rss_mb_children": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }


def _score(references, hypotheses) -> dict:
    from qn_keras.metrics import cer, wer

    return {"wer": wer(references, hypotheses), "cer": cer(references, hypotheses)}


def _per_speaker(ids, references, hypotheses) -> dict:
    groups: dict = {}
    for utt, ref, hyp in zip(ids, references, hypotheses, strict=True):
        groups.setdefault(utt.split("-")[0], ([], []))
        groups[utt.split("-")[0]][0].append(ref)
        groups[utt.split("-")[0]][1].append(hyp)
    return {s: {k: round(v, 4) for k, v in _score(*g).items()} for s, g in sorted(groups.items())}


def _timed_decode(decode, logprobs) -> tuple[list[str], float]:
    started = time.perf_counter()
    texts = [decode(lp) for lp in logprobs]
    return texts, time.perf_counter() - started


def _transcribe_wall(model, manifest, lm, repeat) -> dict:
    """Interleaved runs of `qn transcribe` without and with --lm; medians."""
    plain, with_lm = [], []
    base = _qn("transcribe", "--model", model, manifest, "--no-progress")
    for _ in range(repeat):
        for command, times in ((base, plain), ([*base, "--lm", lm], with_lm)):
            started = time.monotonic()
            subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
            times.append(time.monotonic() - started)
    return {
        "greedy_s": [round(t, 2) for t in plain],
        "lm_s": [round(t, 2) for t in with_lm],
        "median_greedy_s": round(statistics.median(plain), 2),
        "median_lm_s": round(statistics.median(with_lm), 2),
        "lm_over_greedy": round(statistics.median(with_lm) / statistics.median(plain), 3),
    }


def accuracy(args) -> dict:
    from qn_keras.decoding import greedy_decode_ids
    from qn_keras.inference import model_stride
    from qn_keras.lm.decoder import DecoderSettings, LMDecoder
    from qn_keras.lm.tune import TuneResult, best_row, parse_grid, tune_grid, write_results
    from qn_keras.model_dir import load_model_dir
    from qn_keras.training.evaluation import evaluate, evaluation_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "model": args.model, "manifest": args.manifest, "lms": []}
    builds = {}
    for order in args.orders:
        builds[order] = _build(args.text, out / f"lm-{order}", order)

    bundle = load_model_dir(args.model)
    dataset, _ = evaluation_dataset(args.manifest, bundle, 16)
    greedy_eval = evaluate(bundle.model, dataset, bundle.tokenizer, keep_logprobs=True)
    logprobs = greedy_eval.logprobs
    refs = [r["reference"] for r in greedy_eval.utterances]
    ids = [r["utt_id"] for r in greedy_eval.utterances]
    labels = bundle.tokenizer.labels
    frame_s = model_stride(bundle.model) * bundle.featurizer.hop_length
    frame_s /= bundle.featurizer.sample_rate
    audio_s = sum(len(lp) for lp in logprobs) * frame_s
    result.update(utterances=len(refs), audio_seconds=round(audio_s, 1))

    blank = len(labels)
    texts, seconds = _timed_decode(
        lambda lp: bundle.tokenizer.decode(greedy_decode_ids(lp, len(lp), blank)), logprobs
    )
    rows = [{"decoder": "greedy", **_score(refs, texts), "decode_ms_per_audio_s":
             1000 * seconds / audio_s, "per_speaker": _per_speaker(ids, refs, texts)}]  # fmt: skip
    settings = DecoderSettings().replace(beam_width=args.beam)
    args.beam = settings.beam_width
    no_lm = LMDecoder(labels, None, settings)
    texts, seconds = _timed_decode(lambda lp: no_lm.decode(lp).text, logprobs)
    rows.append({"decoder": f"beam {args.beam}, no LM", **_score(refs, texts),
                 "decode_ms_per_audio_s": 1000 * seconds / audio_s,
                 "per_speaker": _per_speaker(ids, refs, texts)})  # fmt: skip
    alphas, betas = parse_grid(args.alpha, "alpha"), parse_grid(args.beta, "beta")
    for order in args.orders:
        lm_dir = out / f"lm-{order}"
        started = time.monotonic()
        grid = tune_grid(logprobs, refs, labels, lm_dir, alphas, betas, settings=settings)
        tune_s = time.monotonic() - started
        best = best_row(grid)
        greedy = {"wer": greedy_eval.wer, "cer": greedy_eval.cer}
        tuned = TuneResult(grid, best, greedy, len(refs), audio_s)
        write_results(lm_dir, tuned, settings, {"model": args.model, "manifest": args.manifest})
        decoder = LMDecoder(labels, lm_dir)  # the tuned setting
        texts, seconds = _timed_decode(lambda lp, d=decoder: d.decode(lp).text, logprobs)
        rows.append({
            "decoder": f"beam {args.beam}, {order}-gram", **_score(refs, texts),
            "alpha": best["alpha"], "beta": best["beta"],
            "decode_ms_per_audio_s": 1000 * seconds / audio_s,
            "tune_grid_cells": len(grid), "tune_s": round(tune_s, 1),
            "per_speaker": _per_speaker(ids, refs, texts), "build": builds[order],
        })  # fmt: skip
    best_order = min(rows[2:], key=lambda r: r["wer"])
    for beam in args.extra_beams:  # the best LM's tuned alpha/beta at other beam widths
        order = int(best_order["decoder"].split(", ")[1].split("-")[0])
        decoder = LMDecoder.from_folder(labels, out / f"lm-{order}", beam_width=beam)
        texts, seconds = _timed_decode(lambda lp, d=decoder: d.decode(lp).text, logprobs)
        rows.append({
            "decoder": f"beam {beam}, {order}-gram", **_score(refs, texts),
            "alpha": decoder.settings.alpha, "beta": decoder.settings.beta,
            "decode_ms_per_audio_s": 1000 * seconds / audio_s,
            "per_speaker": _per_speaker(ids, refs, texts),
        })  # fmt: skip
    greedy_wer = rows[0]["wer"]
    for row in rows:
        row["relative_wer_reduction"] = round(1 - row["wer"] / greedy_wer, 4) if greedy_wer else 0
    result["rows"] = rows
    order = int(best_order["decoder"].split(", ")[1].split("-")[0])
    result["transcribe_wall"] = {
        "lm": f"lm-{order}",
        **_transcribe_wall(args.model, args.manifest, out / f"lm-{order}", args.repeat),
    }
    return result


def _bigram_text(source: Path, words: int, seed: int = 0):
    """Sentences sampled from the source's word bigram chain, ``words`` words in all."""
    rng = np.random.default_rng(seed)
    sentences = [line.split() for line in source.read_text().splitlines() if line.split()]
    successors: dict = {}
    for sentence in sentences:
        for a, b in zip(["<s>", *sentence], [*sentence, "</s>"], strict=True):
            successors.setdefault(a, []).append(b)
    total = 0
    while total < words:
        word, sentence = "<s>", []
        while len(sentence) < 40:
            options = successors[word]
            word = options[int(rng.integers(len(options)))]
            if word == "</s>":
                break
            sentence.append(word)
        if sentence:
            total += len(sentence)
            yield " ".join(sentence)


def build_speed(args) -> dict:
    source = Path(args.text)
    source_words = sum(len(line.split()) for line in source.read_text().splitlines())
    result = {"machine": machine(), "source": str(source), "source_words": source_words,
              "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-lm-") as scratch:
        scratch = Path(scratch)
        repeated = scratch / "repeated.txt"
        text = source.read_text()
        with open(repeated, "w") as f:
            for _ in range(-(-args.words // source_words)):
                f.write(text)
        chain = scratch / "bigram_chain.txt"
        with open(chain, "w") as f:
            for sentence in _bigram_text(source, args.words):
                f.write(sentence + "\n")
        for name, path in (("repeated", repeated), ("bigram chain", chain)):
            for order, prune in ((4, None), (5, None), (5, [0, 1, 1, 1])):
                run = _build(path, scratch / f"lm-{order}", order, prune)
                run["text"] = name
                result["runs"].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    return result


def markdown(result) -> str:
    if "rows" not in result:
        lines = ["| text | order | prune | words | n-grams | build s | lm.bin MB | arpa MB |",
                 "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in result["runs"]:
            lines.append(
                f"| {r['text']} | {r['order']} | {r['prune'] or '-'} | {r['words']:,} | "
                f"{sum(r['ngrams'].values()):,} | {r['wall_s']:.1f} | "
                f"{r['megabytes'].get('lm.bin', 0):.1f} | {r['megabytes']['lm.arpa']:.1f} |"
            )
        return "\n".join(lines)
    lines = ["| decoder | alpha | beta | WER | CER | rel. WER reduction | decode ms per audio s |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['decoder']} | {r.get('alpha', '-')} | {r.get('beta', '-')} | "
            f"{100 * r['wer']:.1f}% | {100 * r['cer']:.1f}% | "
            f"{100 * r['relative_wer_reduction']:.1f}% | {r['decode_ms_per_audio_s']:.3f} |"
        )
    wall = result["transcribe_wall"]
    lines.append(
        f"\n`qn transcribe` wall time, median: greedy {wall['median_greedy_s']} s, with "
        f"--lm {wall['lm']} {wall['median_lm_s']} s ({wall['lm_over_greedy']:.2f}x)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--model", required=True)
    acc.add_argument("--manifest", required=True)
    acc.add_argument("--text", required=True)
    acc.add_argument("--orders", type=int, nargs="+", default=[3, 4, 5])
    acc.add_argument("--out", required=True)
    acc.add_argument("--alpha", default="0:2:0.25")
    acc.add_argument("--beta", default="0:3:0.5")
    acc.add_argument("--beam", type=int, default=None, help="default: the decoder's default")
    acc.add_argument("--extra-beams", type=int, nargs="*", default=[64])
    acc.add_argument("--repeat", type=int, default=3)
    acc.add_argument("--json", help="also write the result here")
    build = sub.add_parser("build")
    build.add_argument("--text", required=True)
    build.add_argument("--words", type=int, default=10_000_000)
    build.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = accuracy(args) if args.mode == "accuracy" else build_speed(args)
    print(json.dumps(result, indent=1))
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
