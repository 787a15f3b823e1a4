"""`qn export`: a model folder as a TF Serving model version (audio in, text out).

    qn export --model runs/x/model --out exports --name qn [--version N] [--tflite dynamic]

Writes exports/qn/N/ (the next free version unless --version is given) with the
`serving_default` (waveform) and `transcribe_wav` (WAV bytes) signatures, warmup requests in
assets.extra/, and exports/qn/models.config + batching_parameters.txt for tensorflow_model_server.
--tflite also writes exports/qn/N/tflite/<mode>.tflite (waveform in, log-probabilities out).
"""

from __future__ import annotations

import argparse


def register(subparsers):
    parser = subparsers.add_parser(
        "export",
        help="export a model folder for TF Serving (and TFLite)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder")
    parser.add_argument("--out", required=True, metavar="BASE", help="export base folder")
    parser.add_argument("--name", required=True, help="model name (folder and URL name)")
    parser.add_argument("--version", type=int, help="version number (default: next free)")
    parser.add_argument(
        "--tflite",
        nargs="+",
        choices=("float32", "float16", "dynamic"),
        default=[],
        metavar="MODE",
        help="also write .tflite files: float32, float16 and/or dynamic (dynamic-range int8)",
    )
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="encoder arithmetic of the SavedModel: bfloat16 is about 1.5x faster on CPUs with "
        "AVX512-BF16 or AMX (and refused on others), at a small cost in accuracy "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip assets.extra/tf_serving_warmup_requests"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from qn_keras.model_dir import load_model_dir
    from serving.export import MODELS_CONFIG, export_model

    bundle = load_model_dir(args.model)
    version_dir = export_model(
        bundle,
        args.out,
        args.name,
        args.version,
        warmup=not args.no_warmup,
        tflite_modes=tuple(args.tflite),
        precision=args.precision,
    )
    print(f"exported {version_dir}")
    print("  signatures: serving_default (waveform), transcribe_wav (WAV bytes)")
    for path in sorted((version_dir / "tflite").glob("*.tflite")):
        print(f"  tflite: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"  TF Serving: --model_config_file={version_dir.parent / MODELS_CONFIG}")
    print(f"  local server: qn serve --model {version_dir.parent}")
    return 0
