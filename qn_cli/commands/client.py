"""`qn client`: transcribe files through a TF Serving (or `qn serve`) endpoint.

    qn client --url http://127.0.0.1:8501 --model qn a.wav b.flac
    qn client --grpc 127.0.0.1:8500 --model qn a.wav

Sends the files to the `transcribe_wav` signature (non-WAV files are re-encoded as WAV first;
the server resamples), or with --signature serving_default decodes them here and sends
16 kHz waveforms. Prints one "path<TAB>transcript" line per file: the server's greedy
transcript, or with --lm DIR (or --beam N) decoded here from the log-probs the server returns,
with the labels the LM was built for (--labels FILE to say otherwise).

    qn client --url http://127.0.0.1:8501 --model qn --lm lms/en-4 a.wav

With --stream FILE (or - for raw 16-bit PCM on standard input) the audio goes to the
model's `stream_step` signature a chunk at a time (models trained with a lookahead), the
stream's state travelling with each request, and the text is shown as it comes:

    qn client --url http://127.0.0.1:8501 --model qn --stream clip.wav
"""

from __future__ import annotations

import argparse

from qn_cli import lm_options, streaming


def register(subparsers):
    parser = subparsers.add_parser(
        "client",
        help="transcribe files through a TF Serving REST or gRPC endpoint",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", metavar="FILE")
    parser.add_argument("--url", default="http://127.0.0.1:8501", help="REST root URL")
    parser.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC at HOST:PORT instead")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--version", type=int, help="model version (default: latest)")
    parser.add_argument(
        "--signature", choices=("transcribe_wav", "serving_default"), default="transcribe_wav"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="files per request")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument(
        "--labels", metavar="FILE", help="the model's labels, for --lm/--beam (default: the LM's)"
    )
    lm_options.add_arguments(parser)
    streaming.add_arguments(parser, model_side=False)
    parser.add_argument(
        "--sample-rate", type=int, default=16000, help="the model's sample rate, for --stream"
    )
    parser.set_defaults(func=run)


def run_stream(args, client) -> int:
    from qn_cli.main import UserError
    from qn_keras.featurizer import FeaturizerConfig
    from qn_keras.streaming.recognizer import StatefulEngine, StreamingRecognizer, StreamSettings
    from serving.client import RemoteStreamStep

    if args.files:
        raise UserError("--stream takes one FILE (or -) itself; give no other files")
    settings = StreamSettings(mode="stateful", chunk_seconds=args.stream_chunk)
    featurizer = FeaturizerConfig(sample_rate=args.sample_rate)
    engine = StatefulEngine(RemoteStreamStep(client), None, featurizer, settings)
    stream = StreamingRecognizer(engine, _labels(args), settings)
    result = streaming.run_stream(
        stream, streaming.blocks(args, args.sample_rate), args.sample_rate, streaming.LiveDisplay()
    )
    print(f"{args.stream}\t{result['text']}", flush=True)
    return 0


def run(args) -> int:
    import sys

    from qn_cli.main import UserError
    from serving.client import GrpcClient, RestClient, ServingError, wav_bytes

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    decoder = lm_options.decoder_from_args(args, _labels(args))
    if args.grpc:
        client = GrpcClient(args.grpc, args.model, args.version, args.timeout)
    else:
        client = RestClient(args.url, args.model, args.version, args.timeout)
    try:
        if args.stream:
            return run_stream(args, client)
        if not args.files:
            raise UserError("Give files to transcribe (or --stream FILE).")
        for start in range(0, len(args.files), args.batch_size):
            paths = args.files[start : start + args.batch_size]
            if args.signature == "transcribe_wav":
                prediction = client.transcribe_wav([wav_bytes(p) for p in paths])
            else:
                from qn_keras.audio import decode_audio

                prediction = client.transcribe_waveforms([decode_audio(p) for p in paths])
            texts = prediction.transcripts
            if decoder is not None:
                if prediction.logprobs.shape[-1] != len(decoder.labels) + 1:
                    raise UserError(
                        f"the server's log-probs have {prediction.logprobs.shape[-1]} classes; "
                        f"the labels for --lm/--beam have {len(decoder.labels)} + blank "
                        "(give the model's labels with --labels FILE)"
                    )
                texts = decoder.decode_texts(prediction.logprobs, prediction.logprob_lengths)
            for path, text in zip(paths, texts, strict=True):
                print(f"{path}\t{text}", flush=True)
    except ServingError as e:
        print(f"qn client: server error {e.code}: {e.message}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def _labels(args):
    """The labels for client-side decoding: --labels, else the LM folder's, else English."""
    from qn_keras.tokenizer import ENGLISH_LABELS, CharTokenizer

    if args.labels:
        return CharTokenizer.from_file(args.labels).labels
    if args.lm:
        from qn_keras.lm.folder import load_lm_folder

        labels = load_lm_folder(args.lm).labels
        if labels:
            return labels
    return ENGLISH_LABELS
