"""`qn transcribe`: transcripts of audio files, folders or NeMo manifests.

    qn transcribe --model DIR a.wav b.flac          # one "path<TAB>transcript" line per file
    qn transcribe --model DIR audio_folder/ --output results.jsonl --timestamps
    qn transcribe --model DIR dev.json --beam 8 --logprobs-dir logprobs/
    qn transcribe --model DIR --lm lms/en-4 clip.wav --timestamps   # n-gram LM beam search
    qn transcribe --model DIR --stream clip.wav      # live: partial and final text as it plays
    arecord -f S16_LE -r 16000 -c 1 -t raw | qn transcribe --model DIR --stream -

DIR is a model folder (`qn train`, `qn import-nemo`) or an exported model (`qn export`:
BASE/NAME for its latest version, or BASE/NAME/N). Any soundfile format and sample rate.
Files longer than --max-whole-seconds are transcribed in overlapping chunks in bounded
memory, with the same result as whole-file transcription.
"""

from __future__ import annotations

import argparse

from qn_cli import lm_options, streaming


def register(subparsers):
    parser = subparsers.add_parser(
        "transcribe",
        help="transcribe audio files, folders or manifests",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="model or export folder")
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="audio files, folders, manifests"
    )
    parser.add_argument("--output", metavar="FILE", help="write JSON lines (one per file)")
    parser.add_argument(
        "--logprobs-dir", metavar="DIR", help="write <stem>.npy log-probabilities [frames, V]"
    )
    parser.add_argument("--timestamps", action="store_true", help="word start/end times")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-whole-seconds",
        type=float,
        default=60.0,
        help="longer files are transcribed in chunks (default 60)",
    )
    parser.add_argument("--chunk-seconds", type=float, default=30.0)
    parser.add_argument("--context-seconds", type=float, default=5.0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--decode-processes",
        type=int,
        default=None,
        metavar="N",
        help="worker processes for the LM search, beside the model (default: one per core, "
        "at most 4; 0: in this process)",
    )
    lm_options.add_arguments(parser)
    streaming.add_arguments(parser)
    parser.set_defaults(func=run)


def _stem_names(transcripts) -> list[str]:
    """<stem>.npy names, made unique when two inputs share a stem (a/x.wav, b/x.flac)."""
    names, seen = [], {}
    for transcript in transcripts:
        stem = transcript.item.path.stem
        if transcript.item.offset or transcript.item.duration is not None:
            stem = f"{stem}_{transcript.item.offset:g}"
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(f"{stem}.npy" if count == 0 else f"{stem}_{count}.npy")
    return names


def _labels_without_tensorflow(model) -> tuple | None:
    """The labels in a model folder's qn_model.json or an export's qn_export.json, or None."""
    import json
    from pathlib import Path

    from serving.layout import existing_versions, read_export_metadata

    path = Path(model)
    try:
        if (path / "qn_model.json").is_file():
            return tuple(json.loads((path / "qn_model.json").read_text())["labels"])
        versions = existing_versions(path) if path.is_dir() else []
        meta = read_export_metadata(path / str(max(versions)) if versions else path)
        return tuple(meta["labels"]) if meta else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_recognizer says what is wrong


def _decoder(args, labels):
    """--lm / --hotword: the LM search (in --decode-processes workers); --beam alone is the
    Transcriber's own prefix beam search (beam_width), so None then, as for greedy."""
    import os

    decoder = lm_options.decoder_from_args(args, labels, plain_beam=False)
    processes = args.decode_processes
    if processes is None:
        processes = min(4, os.cpu_count() or 1)
    if decoder is not None and processes > 0:
        from qn_keras.lm.decoder import ParallelLMDecoder

        decoder = ParallelLMDecoder(decoder, processes=processes)
    return decoder


def run_stream(args) -> int:
    """--stream: one file or standard input through a StreamingRecognizer."""
    from qn_cli.main import UserError
    from qn_keras.streaming.recognizer import StreamSettings
    from serving.recognizer import load_recognizer
    from serving.streaming import streaming_recognizer

    if args.inputs:
        raise UserError("--stream takes one FILE (or -) itself; give no other inputs")
    if args.lm or args.beam or args.hotword:
        raise UserError("--stream decodes greedily; --lm, --beam and --hotword are for files")
    settings = StreamSettings(
        mode=args.stream_mode,
        chunk_seconds=args.stream_chunk,
        left_seconds=args.left_context,
        right_seconds=args.right_context,
        normalization=args.normalization,
    )
    recognizer = load_recognizer(args.model)
    stream = streaming_recognizer(recognizer, settings)
    rate = recognizer.sample_rate
    result = streaming.run_stream(
        stream, streaming.blocks(args, rate), rate, streaming.LiveDisplay()
    )
    print(f"{args.stream}\t{result['text']}")
    if args.output:
        from pathlib import Path

        from qn_keras import files

        record = {
            "audio_filepath": args.stream,
            "duration": round(result["seconds"], 4),
            "pred_text": result["text"],
            "stream_mode": stream.mode,
            "latency_seconds": round(stream.latency_seconds, 3),
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        files.write_json_lines(Path(args.output), [record])
    return 0


def run(args) -> int:
    import sys
    from pathlib import Path

    if args.stream:
        return run_stream(args)
    if not args.inputs:
        from qn_cli.main import UserError

        raise UserError("Give audio files, folders or manifests to transcribe (or --stream).")

    import numpy as np
    from tqdm import tqdm

    from qn_cli.main import UserError
    from qn_keras import files

    # The LM search's worker processes start loading before TensorFlow does (seconds), when
    # the model's labels can be read from its JSON; a bad --lm is reported before that too.
    early_labels = _labels_without_tensorflow(args.model)
    decoder = _decoder(args, early_labels) if early_labels else None

    from serving.recognizer import load_recognizer
    from serving.transcribe import TranscribeOptions, Transcriber, collect_inputs

    items = collect_inputs(args.inputs)
    if not items:
        raise UserError("No audio to transcribe.")
    recognizer = load_recognizer(args.model)
    if early_labels != recognizer.labels:
        if hasattr(decoder, "close"):
            decoder.close()
        decoder = _decoder(args, recognizer.labels)
    options = TranscribeOptions(
        batch_size=args.batch_size,
        beam_width=args.beam or 1,
        timestamps=args.timestamps,
        keep_logprobs=bool(args.logprobs_dir),
        max_whole_seconds=args.max_whole_seconds,
        chunk_seconds=args.chunk_seconds,
        context_seconds=args.context_seconds,
    )
    transcriber = Transcriber(recognizer, options, decoder=decoder)
    logprobs_dir = Path(args.logprobs_dir) if args.logprobs_dir else None
    if logprobs_dir:
        logprobs_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=None, unit="s", desc="transcribing", disable=args.no_progress, file=sys.stderr
    ) as bar:
        try:
            results = transcriber.transcribe(
                items,
                progress=lambda seconds: bar.update(round(seconds, 2)),
                on_total=lambda seconds: setattr(bar, "total", round(seconds, 2)),
            )
        finally:
            if hasattr(decoder, "close"):
                decoder.close()
    failed = 0
    names = _stem_names(results)
    records = []
    for transcript, name in zip(results, names, strict=True):
        record = transcript.to_json()
        if transcript.error is not None:
            failed += 1
            print(f"qn transcribe: {transcript.error}", file=sys.stderr)
        else:
            print(f"{transcript.item.path}\t{transcript.text}")
            if logprobs_dir is not None:
                np.save(logprobs_dir / name, transcript.logprobs)
                record["logprobs"] = str(logprobs_dir / name)
        records.append(record)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_json_lines(out, records)
    if failed:
        print(f"qn transcribe: {failed} of {len(results)} files failed", file=sys.stderr)
        return 1
    return 0
