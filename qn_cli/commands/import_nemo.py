"""`qn import-nemo MODEL.nemo --out DIR`: a NeMo QuartzNet/Jasper checkpoint to a model folder."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers):
    parser = subparsers.add_parser(
        "import-nemo",
        help="convert a NeMo QuartzNet/Jasper .nemo checkpoint into a model folder",
        description=(
            "Reads a NeMo .nemo checkpoint (character CTC model with a ConvASREncoder: "
            "QuartzNet, Jasper) and writes a qn-keras model folder: Keras model, vocabulary, "
            "featurizer settings with the checkpoint's own mel filterbank and window, and a "
            "serving SavedModel. Needs PyTorch to read the weights: pip install '.[nemo]'."
        ),
    )
    parser.add_argument("nemo_file", type=Path, metavar="MODEL.nemo")
    parser.add_argument("--out", type=Path, required=True, help="model folder to create")
    parser.add_argument(
        "--era",
        choices=("legacy", "current"),
        default=None,
        help=(
            "front end to reproduce: 'legacy' (NeMo < 2.5, what every released QuartzNet was "
            "trained with) or 'current' (NeMo >= 2.5). Default: from the NeMo version that "
            "saved the checkpoint; legacy when it records none."
        ),
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it already exists"
    )
    parser.add_argument(
        "--no-saved-model",
        action="store_true",
        help="skip the serving SavedModel (faster; `qn export` can make it later)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from qn_cli.main import UserError

    out = args.out
    if out.exists() and not args.overwrite:
        raise UserError(
            f"{out} already exists; pass --overwrite to replace it or choose another --out"
        )
    if not args.nemo_file.is_file():
        raise UserError(f"NeMo checkpoint not found: {args.nemo_file}")
    from tqdm import tqdm

    from qn_keras.model_dir import save_model_dir
    from qn_keras.nemo import import_nemo
    from qn_keras.summary import trainable_parameters

    steps = ["read checkpoint, build model, load weights", "write model folder"]
    with tqdm(
        total=len(steps), desc="import-nemo", unit="step", file=sys.stderr, leave=False
    ) as bar:
        bar.set_postfix_str(steps[0])
        bundle = import_nemo(args.nemo_file, era=args.era)
        bar.update()
        bar.set_postfix_str(steps[1])
        save_model_dir(out, bundle, serving=not args.no_saved_model, overwrite=True)
        bar.update()
    meta = bundle.metadata
    params = trainable_parameters(bundle.model)
    print(f"{args.nemo_file.name} -> {out}")
    print(
        f"  {meta['nemo_target'].rsplit('.', 1)[-1]}, {len(bundle.model.block_args['stackwise_filters'])} "
        f"blocks, {params:,} parameters, {bundle.tokenizer.vocabulary_size} outputs "
        f"({len(bundle.tokenizer.labels)} labels + blank)"
    )
    print(f"  front end: {meta['era']} ({meta['era_source']})")
    for note in meta["notes"]:
        print(f"  note: {note}")
    return 0
