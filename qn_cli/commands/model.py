"""`qn model summary`: parameters and multiply-accumulates per second of audio of a preset."""

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
