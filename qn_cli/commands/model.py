"""`qn model summary`: parameters and multiply-accumulates per second of audio of a preset.
`qn model prior`: a model folder's feature prior for streaming, from audio like its training
data (`qn train` writes one itself when it can read the training audio)."""

from __future__ import annotations

import json


def register(subparsers):
    parser = subparsers.add_parser("model", help="inspect model architectures")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    sub.required = True
    summary = sub.add_parser("summary", help="parameters and MACs per second of a preset")
    summary.add_argument("--preset", required=True, help="preset name, e.g. quartznet_15x5")
    summary.add_argument("--vocabulary-size", type=int, default=29)
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.set_defaults(func=run_summary)
    prior = sub.add_parser(
        "prior",
        help="estimate a model folder's feature prior (streaming normalization) from audio",
    )
    prior.add_argument("model", metavar="MODEL", help="model folder (qn train, qn import-nemo)")
    prior.add_argument("inputs", nargs="+", metavar="AUDIO", help="files, folders, manifests")
    prior.add_argument("--files", type=int, default=200, help="files to use at most (200)")
    prior.set_defaults(func=run_prior)
    presets = sub.add_parser("presets", help="list preset names")
    presets.set_defaults(func=run_presets)


def run_summary(args) -> int:
    from qn_keras.presets import build_model, preset_kwargs
    from qn_keras.summary import model_summary

    preset_kwargs(args.preset)  # a clear error for unknown names before building anything
    summary = model_summary(build_model(args.preset, vocabulary_size=args.vocabulary_size))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['name']}: {summary['params']:,} parameters")
    print(f"  {summary['macs_per_second'] / 1e6:,.1f} M multiply-accumulates per second of audio")
    print(f"  {summary['blocks']} blocks, {summary['output_frame_ms']} ms output frames")
    return 0


def run_presets(args) -> int:
    from qn_keras.presets import PRESETS

    for name in sorted(PRESETS):
        print(name)
    return 0


def run_prior(args) -> int:
    import dataclasses

    from qn_keras.model_dir import load_model_dir, save_model_dir
    from qn_keras.streaming.normalization import METADATA_KEY
    from qn_keras.streaming.prior import audio_paths, prior_from_audio

    bundle = load_model_dir(args.model)
    paths = audio_paths(args.inputs)
    prior = prior_from_audio(paths, bundle.featurizer_layer(), limit=args.files)
    metadata = {**bundle.metadata, METADATA_KEY: prior.to_dict()}
    save_model_dir(args.model, dataclasses.replace(bundle, metadata=metadata))
    print(f"{args.model}: feature prior of {prior.utterances} files written")
    return 0
