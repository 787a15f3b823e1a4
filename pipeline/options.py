"""Command-line flags of the feature job, kept free of Beam and TensorFlow imports so that
``qn --help`` stays fast. Values are validated by ``FeatureJobConfig``."""

from __future__ import annotations

import argparse

from qn_keras.choices import ERAS, OOV_POLICIES

COMPRESSIONS = ("none", "gzip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's own flags (``qn features`` and ``python -m pipeline.features_job``); the rest of
    the command line goes to Beam."""
    parser.add_argument(
        "--manifest",
        dest="manifests",
        action="append",
        required=True,
        metavar="PATH",
        help="NeMo JSON-lines manifest, CSV/TSV file or LibriSpeech-style folder (repeatable)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--shards", type=int, default=4, help="number of TFRecord shards (0: runner decides)"
    )
    parser.add_argument(
        "--speed-perturb",
        default="",
        metavar="RATES",
        help="extra copies at these speeds, e.g. 0.9,1.1 (NeMo's recipe)",
    )
    parser.add_argument(
        "--narrowband",
        default="",
        metavar="RATES",
        help="extra band-limited copies of every utterance (and speed copy), resampled through "
        "these sample rates, e.g. 8000 for telephone-band or 8 kHz sources",
    )
    parser.add_argument("--era", choices=ERAS, default="current", help="featurizer front end")
    parser.add_argument(
        "--max-duration", type=float, default=None, metavar="S", help="reject longer audio"
    )
    parser.add_argument(
        "--oov",
        choices=OOV_POLICIES,
        default="drop",
        help="transcript characters outside the vocabulary: drop them or reject the utterance",
    )
    parser.add_argument("--compression", choices=COMPRESSIONS, default="none")
    parser.add_argument(
        "--labels", default=None, metavar="FILE", help="label set file (default: NeMo English)"
    )
    parser.add_argument(
        "--featurize-threads",
        type=int,
        default=0,
        help="threads decoding and featurizing in each worker (0: one per CPU core)",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow threads per worker (0: TensorFlow's default)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
