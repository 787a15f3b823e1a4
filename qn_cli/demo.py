"""`make demo`: featurize, train, export and transcribe, end to end on the CPU, offline.

1. Featurizes the project's own spoken-digit corpus (``sample_data/``) with the Beam pipeline.
2. Trains a small QuartzNet (``configs/demo.yaml``) for a bounded time.
3. Exports the model folder with its serving SavedModel.
4. Transcribes the held-out clips (voices never heard in training) through that SavedModel's
   ``serving_default`` signature (waveform in, text out) and prints their WER.
5. Builds a 3-gram LM of the training transcripts (KenLM) and decodes the same clips' log-probs
   with it (beam search, default settings).

Everything goes to ``runs/demo/`` (started afresh each time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"
CONFIG = REPO / "configs" / "demo.yaml"


class DemoError(Exception):
    """Something the demo cannot work around; the message says what to do."""


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def featurize(manifest: Path, out: Path) -> dict:
    from pipeline.features_job import run as run_features_job

    start = time.monotonic()
    info = run_features_job(["--manifest", str(manifest), "--out", str(out), "--shards", "2"])
    print(
        f"   {manifest.name}: {info['num_utterances']} utterances, {info['hours'] * 60:.1f} min "
        f"of audio, {info['num_failed']} failed, {time.monotonic() - start:.0f} s -> {out}"
    )
    if info["num_utterances"] == 0:
        raise DemoError(f"No utterance of {manifest} could be featurized; see {out}.")
    return info


def transcribe_with_saved_model(saved_model_dir: Path, manifest: Path, batch_size: int = 16):
    """(references, hypotheses) for every utterance of ``manifest``, decoded by the serving
    signature: the waveform goes in, the text comes out."""
    import tensorflow as tf

    from qn_keras.audio import decode_audio, pad_batch
    from qn_keras.data.manifest import load_utterances
    from qn_keras.tokenizer import CharTokenizer

    serving = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]
    tokenizer = CharTokenizer()
    utterances = load_utterances([str(manifest)])
    refs, hyps, logprobs = [], [], []
    for i in range(0, len(utterances), batch_size):
        chunk = utterances[i : i + batch_size]
        waves = [decode_audio(u.audio_filepath, target_rate=16000) for u in chunk]
        batch, lengths = pad_batch(waves)
        out = serving(waveform=tf.constant(batch), lengths=tf.constant(lengths))
        hyps.extend(t.decode("utf-8") for t in out["transcripts"].numpy())
        refs.extend(tokenizer.normalize(u.text).text for u in chunk)
        lengths = out["logprob_lengths"].numpy()
        logprobs.extend(lp[:n] for lp, n in zip(out["logprobs"].numpy(), lengths, strict=True))
    return refs, hyps, logprobs


def decode_with_lm(train_manifest: Path, lm_dir: Path, logprobs) -> list[str] | None:
    """A 3-gram LM of the training transcripts (KenLM), then beam search with it at the default
    settings (not tuned on the held-out clips, which would flatter it)."""
    from qn_keras.errors import UserInputError
    from qn_keras.lm.build import build_lm
    from qn_keras.lm.decoder import LMDecoder
    from qn_keras.tokenizer import CharTokenizer

    try:
        meta = build_lm([train_manifest], lm_dir, order=3)
    except UserInputError as e:  # no lmplz on this machine: the demo still stands
        print(f"   skipped: {e}")
        return None
    print(f"   {lm_dir.relative_to(REPO) if lm_dir.is_relative_to(REPO) else lm_dir}: "
          f"{meta['text']['words']} words, n-grams {meta['ngrams']}")  # fmt: skip
    decoder = LMDecoder(CharTokenizer().labels, lm_dir)
    return [decoder.decode(lp).text for lp in logprobs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "demo"), help="output folder")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="training time limit (config: 10)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return run(Path(args.out), args.max_minutes)
    except DemoError as e:
        print(f"\ndemo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130


def run(out: Path, max_minutes) -> int:
    started = time.monotonic()
    train_manifest, dev_manifest = SAMPLE_DATA / "train.json", SAMPLE_DATA / "dev.json"
    for path in (train_manifest, dev_manifest, CONFIG):
        if not path.is_file():
            raise DemoError(f"{path} is missing; the demo needs a complete checkout of the repo.")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    banner("1/5 Featurizing sample_data/ with the Beam pipeline (DirectRunner)")
    featurize(train_manifest, out / "features" / "train")
    featurize(dev_manifest, out / "features" / "dev")

    banner(f"2/5 Training a small QuartzNet ({CONFIG.relative_to(REPO)}) on the CPU")
    import tensorflow as tf

    from qn_keras.metrics import cer, wer
    from qn_keras.training import Trainer, TrainingDivergedError, load_config

    config = load_config(CONFIG)
    trainer = Trainer(config, out / "train", out / "features" / "train", out / "features" / "dev")
    print(
        f"   {trainer.train_data.num_utterances} training clips, "
        f"{trainer.val_data.num_utterances} held-out clips (unseen voices), "
        f"devices: {[d.name for d in tf.config.list_logical_devices()]}"
    )
    try:
        result = trainer.fit(max_minutes=max_minutes)
    except TrainingDivergedError as e:
        raise DemoError(str(e)) from None
    throughput = result.report["throughput"]
    print(
        f"   {result.steps} steps in {result.report['wall_time_s'] / 60:.1f} min "
        f"({throughput['utterances_per_s'] or 0:.0f} utterances/s), stopped by "
        f"{result.stopped_reason}; best held-out WER during training "
        f"{result.best['wer']:.1%} at step {result.best['step']}"
    )

    banner("3/5 Exported model folder")
    model_dir = result.model_dir
    saved_model = model_dir / "saved_model"
    for item in sorted(model_dir.iterdir()):
        print(f"   {item.relative_to(out)}")
    print(f"   curves: {out / 'train' / 'curves.png'}")

    banner("4/5 Transcribing the held-out clips through the serving SavedModel")
    refs, hyps, logprobs = transcribe_with_saved_model(saved_model, dev_manifest)
    for ref, hyp in list(zip(refs, hyps, strict=True))[:8]:
        mark = "  " if ref == hyp else "x "
        print(f"   {mark}ref: {ref:<32} hyp: {hyp}")
    held_out_wer, held_out_cer = wer(refs, hyps), cer(refs, hyps)
    print(
        f"\n   held-out WER {held_out_wer:.1%}, CER {held_out_cer:.1%} over {len(refs)} clips "
        f"(greedy decoding in the SavedModel)"
    )

    banner("5/5 The same clips decoded with an n-gram LM of the training transcripts")
    lm_hyps = decode_with_lm(train_manifest, out / "lm", logprobs)
    if lm_hyps is not None:
        print(
            f"   held-out WER {wer(refs, lm_hyps):.1%}, CER {cer(refs, lm_hyps):.1%} with the "
            f"LM (greedy {held_out_wer:.1%}); qn transcribe --lm {out / 'lm'} does the same"
        )
    print(f"\n   total demo time {(time.monotonic() - started) / 60:.1f} min")
    if held_out_wer >= 0.9:
        raise DemoError(
            f"The model did not learn (held-out WER {held_out_wer:.1%}). Training ran "
            f"{result.steps} steps; the report is {out / 'train' / 'training_report.json'}."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
