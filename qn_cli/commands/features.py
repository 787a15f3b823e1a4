"""`qn features`: the Beam feature job, manifests to sharded TFRecords of log-mel features.

Flags this command does not know go to Beam's PipelineOptions. Without --runner it runs
locally, decoding and featurizing on one thread per CPU core (--featurize-threads). Several
worker processes (each imports TensorFlow first, ~6 s of CPU: worth it for hours of audio):

    qn features --manifest train.json --out feats/train \\
        --direct_num_workers 2 --direct_running_mode multi_processing --featurize-threads 1

On a Dask cluster (tested here with a scheduler and two worker processes on 127.0.0.1; needs
the `dask` extra):

    dask scheduler --host 127.0.0.1 --port 8786 &
    dask worker tcp://127.0.0.1:8786 --nworkers 2 --nthreads 1 &
    qn features --manifest train.json --out feats/train \\
        --runner dask --dask_client_address tcp://127.0.0.1:8786

On Dataflow (ship the package to the workers with setup.py; not tested here):

    qn features --manifest gs://bucket/train.json --out gs://bucket/feats/train \\
        --runner DataflowRunner --project PROJECT --region REGION \\
        --temp_location gs://bucket/tmp --setup_file ./setup.py
"""

from __future__ import annotations

import argparse


def register(subparsers):
    parser = subparsers.add_parser(
        "features",
        help="featurize manifests into sharded TFRecords (Apache Beam)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from pipeline.options import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=run, accepts_extra_args=True)


def format_summary(info: dict, seconds: float, out: str) -> str:
    lines = [
        f"wrote {info['num_utterances']} utterances "
        f"({info['num_source_utterances']} from the manifests), "
        f"{info['hours']:.3f} h of audio, to {len(info['shards'])} shard(s) in {out}",
        f"failed: {info['num_failed']}"
        + (
            " (" + ", ".join(f"{k}: {v}" for k, v in info["failed_by_reason"].items()) + ")"
            if info["num_failed"]
            else ""
        ),
    ]
    if info["num_failed"]:
        lines.append(f"  each failure is listed in {out}/{info['failures_file']}")
    lines.append(f"time: {seconds:.1f} s")
    return "\n".join(lines)


def run(args) -> int:
    import time

    from pipeline.features_job import config_from_args, run_job

    config = config_from_args(args)
    start = time.monotonic()
    print(f"qn features: featurizing {', '.join(config.manifests)} -> {config.output_dir}")
    info = run_job(config, args.extra_args)
    print(format_summary(info, time.monotonic() - start, config.output_dir))
    return 0
