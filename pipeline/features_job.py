"""Beam job: speech manifests -> sharded TFRecords of log-mel features.

Writes into the output folder:

- ``features-SSSSS-of-NNNNN.tfrecord[.gz]``: the records (schema: :mod:`qn_keras.data.schema`);
- ``failures.jsonl``: one line per rejected input (source, utt_id, audio_filepath, reason,
  message);
- ``dataset_info.json``: feature settings, vocabulary, counts written and failed by reason,
  hours, length histogram, the job's configuration. Written last, once every shard is in
  place, so its presence marks a complete folder.

Run it as ``qn features ...`` or ``python -m pipeline.features_job ...``; flags this module
does not know go to Beam's ``PipelineOptions`` (``--runner``, ``--direct_num_workers``,
``--project``, ...).

Shards are never half-written under their final names: Beam's file sinks write each shard to
``beam-temp-*/<uuid>`` in the output folder and rename it in a finalize step after all writers
succeeded. On top of that, a local output folder is built under a hidden temporary name beside
the target and renamed into place only when the job has finished, so an interrupted run leaves
nothing at the target at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from pipeline.options import COMPRESSIONS, add_arguments
from pipeline.stats import CountByReasonFn, DatasetStatsFn
from pipeline.transforms import FAILED, NAMESPACE, FeaturizeUtterances, ReadManifests, to_tf_example
from qn_keras import files
from qn_keras.data.dataset_info import DATASET_INFO, build_dataset_info
from qn_keras.data.schema import SCHEMA_VERSION
from qn_keras.data.text import OOV_POLICIES
from qn_keras.errors import UserInputError
from qn_keras.featurizer import ERAS, FeaturizerConfig
from qn_keras.tokenizer import ENGLISH_LABELS, CharTokenizer

logger = logging.getLogger(__name__)

SHARD_PREFIX = "features"
FAILURES_FILE = "failures.jsonl"


@dataclasses.dataclass
class FeatureJobConfig:
    """Everything the job does, recorded in ``dataset_info.json``."""

    manifests: list[str]
    output_dir: str
    shards: int = 4
    speed_perturb: tuple[float, ...] = ()
    narrowband: tuple[int, ...] = ()
    era: str = "current"
    max_duration: float | None = None
    oov: str = "drop"
    compression: str = "none"
    labels: tuple[str, ...] = ENGLISH_LABELS
    featurize_threads: int = 0
    intra_op_threads: int = 0
    overwrite: bool = False

    def __post_init__(self):
        self.compression = (self.compression or "none").lower()
        if not self.manifests:
            raise UserInputError("At least one manifest is needed (--manifest PATH).")
        if self.era not in ERAS:
            raise UserInputError(f"era must be one of {ERAS}. Received: era={self.era!r}")
        if self.oov not in OOV_POLICIES:
            raise UserInputError(f"oov must be one of {OOV_POLICIES}. Received: oov={self.oov!r}")
        if self.compression not in COMPRESSIONS:
            raise UserInputError(f"compression must be one of {COMPRESSIONS}: {self.compression!r}")
        if self.shards < 0:
            raise UserInputError(f"shards must be >= 0 (0: the runner decides): {self.shards}")
        if any(not 0.5 <= r <= 2.0 for r in self.speed_perturb):
            raise UserInputError(
                f"speed perturbation rates must lie in [0.5, 2]: {self.speed_perturb}"
            )
        rate = self.featurizer.sample_rate
        if any(not 2000 <= r < rate for r in self.narrowband):
            raise UserInputError(
                f"--narrowband sample rates must lie in [2000, {rate}) Hz: {self.narrowband}"
            )
        if self.max_duration is not None and self.max_duration <= 0:
            raise UserInputError(f"max_duration must be positive: {self.max_duration}")

    @property
    def featurizer(self) -> FeaturizerConfig:
        return FeaturizerConfig(era=self.era)

    @property
    def compression_type(self) -> str:
        return (
            CompressionTypes.GZIP if self.compression == "gzip" else CompressionTypes.UNCOMPRESSED
        )

    @property
    def shard_suffix(self) -> str:
        return ".tfrecord.gz" if self.compression == "gzip" else ".tfrecord"

    def to_dict(self) -> dict:
        config = dataclasses.asdict(self)
        config["speed_perturb"] = list(self.speed_perturb)
        config["narrowband"] = list(self.narrowband)
        config["labels"] = list(self.labels)
        return config


def _stats_input(item) -> tuple:
    return item.num_frames, item.duration, item.is_source


def _failure_line(failure) -> str:
    return json.dumps(failure.to_dict(), ensure_ascii=False, sort_keys=True)


class WriteShards(beam.PTransform):
    """Featurized utterances -> TFRecord shards; outputs the final shard paths."""

    def __init__(self, output_dir: str, config: FeatureJobConfig):
        super().__init__()
        self.output_dir = output_dir
        self.config = config

    def expand(self, featurized):
        return (
            featurized
            | "ToTFExample" >> beam.Map(to_tf_example)
            | "WriteTFRecords"
            >> beam.io.WriteToTFRecord(
                FileSystems.join(self.output_dir, SHARD_PREFIX),
                file_name_suffix=self.config.shard_suffix,
                num_shards=self.config.shards,
                compression_type=self.config.compression_type,
            )
        )


class WriteFailures(beam.PTransform):
    """Failure records -> ``failures.jsonl`` (one file, present even when empty)."""

    def __init__(self, output_dir: str):
        super().__init__()
        self.output_dir = output_dir

    def expand(self, failures):
        name, suffix = os.path.splitext(FAILURES_FILE)
        return (
            failures
            | "ToJsonLine" >> beam.Map(_failure_line)
            | "WriteJsonLines"
            >> beam.io.WriteToText(
                FileSystems.join(self.output_dir, name),
                file_name_suffix=suffix,
                shard_name_template="",
            )
        )


def _write_json_atomically(path: str, payload: dict) -> None:
    # Through Beam's file systems (gs:// and other remote outputs), so not qn_keras.files.
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(temp) as f:
        f.write(json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8"))
    FileSystems.rename([temp], [path])


def write_dataset_info(
    _,
    output_dir: str,
    job_config: dict,
    beam_args: list,
    stats: dict,
    failed_by_reason: dict,
    shard_paths: list,
    failure_paths: list,
) -> str:
    info = build_dataset_info(
        schema_version=SCHEMA_VERSION,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        featurizer=FeaturizerConfig(era=job_config["era"]),
        tokenizer=CharTokenizer(job_config["labels"]),
        shards=shard_paths,
        compression=job_config["compression"],
        stats=stats,
        failed_by_reason=failed_by_reason,
        failures_file=FAILURES_FILE if failure_paths else None,
        pipeline={**job_config, "beam_args": list(beam_args)},
    )
    path = FileSystems.join(output_dir, DATASET_INFO)
    _write_json_atomically(path, info)
    return path


def build_pipeline(
    pipeline: beam.Pipeline, config: FeatureJobConfig, output_dir: str, beam_args=()
) -> beam.PCollection:
    """Adds the job to ``pipeline``, writing into ``output_dir``; returns the PCollection
    holding the path of ``dataset_info.json``."""
    read = pipeline | "ReadManifests" >> ReadManifests(config.manifests)
    processed = read["utterances"] | "FeaturizeUtterances" >> FeaturizeUtterances(
        config.featurizer.to_dict(),
        config.labels,
        oov=config.oov,
        max_duration=config.max_duration,
        speed_perturb=config.speed_perturb,
        narrowband=config.narrowband,
        threads=config.featurize_threads,
        intra_op_threads=config.intra_op_threads,
    )
    featurized = processed["featurized"]
    failures = (read[FAILED], processed[FAILED]) | "AllFailures" >> beam.Flatten()

    shard_paths = featurized | "WriteShards" >> WriteShards(output_dir, config)
    failure_paths = failures | "WriteFailures" >> WriteFailures(output_dir)
    stats = (
        featurized
        | "StatsInput" >> beam.Map(_stats_input)
        | "DatasetStats" >> beam.CombineGlobally(DatasetStatsFn())
    )
    failed_by_reason = failures | "CountFailures" >> beam.CombineGlobally(CountByReasonFn())
    # The info file takes the written shard and failure paths as side inputs, so it runs only
    # after both sinks have finalized: its presence means the folder is complete.
    return (
        pipeline
        | "InfoTrigger" >> beam.Create([None])
        | "WriteDatasetInfo"
        >> beam.Map(
            write_dataset_info,
            output_dir=output_dir,
            job_config=config.to_dict(),
            beam_args=list(beam_args),
            stats=beam.pvalue.AsSingleton(stats),
            failed_by_reason=beam.pvalue.AsSingleton(failed_by_reason),
            shard_paths=beam.pvalue.AsList(shard_paths),
            failure_paths=beam.pvalue.AsList(failure_paths),
        )
    )


# Short runner names for runners Beam knows only by module path.
RUNNER_ALIASES = {
    "dask": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "daskrunner": "apache_beam.runners.dask.dask_runner.DaskRunner",
}


def _expand_runner(beam_args: Sequence[str]) -> list[str]:
    args, out, i = list(beam_args), [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--runner" and i + 1 < len(args):
            out += ["--runner", RUNNER_ALIASES.get(args[i + 1].lower(), args[i + 1])]
            i += 2
            continue
        if arg.startswith("--runner="):
            name = arg.split("=", 1)[1]
            arg = "--runner=" + RUNNER_ALIASES.get(name.lower(), name)
        out.append(arg)
        i += 1
    return out


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam's options from the flags ``qn features`` does not know; ``--runner dask`` names
    Beam's DaskRunner (point it at a cluster with ``--dask_client_address tcp://HOST:8786``;
    it needs the ``dask`` extra: ``pip install 'qn-keras[dask]'``)."""
    args = _expand_runner(beam_args)
    if RUNNER_ALIASES["dask"] in args or f"--runner={RUNNER_ALIASES['dask']}" in args:
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            raise UserInputError(
                "--runner dask needs dask and distributed: pip install 'qn-keras[dask]' "
                "(or -r requirements-dask.txt)."
            ) from None
    return PipelineOptions(args)


def make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A pipeline for ``options``. Without ``--runner`` it runs on the FnApiRunner, the batch
    engine behind Beam's DirectRunner, which honours ``--direct_num_workers`` and
    ``--direct_running_mode``. (Naming DirectRunner itself first tries the Prism runner, which
    downloads a binary at start-up and falls back to the FnApiRunner when it cannot.)"""
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = "FnApiRunner"
    if options.view_as(DirectOptions).direct_running_mode == "multi_threading":
        # Measured with Beam 2.77 on this job: 2 threads wrote 915-917 of 920 records to fixed
        # shards while every counter said 920; in_memory and multi_processing wrote all 920.
        raise UserInputError(
            "--direct_running_mode=multi_threading loses records in Beam's local runner when "
            "writing sharded TFRecords; use --direct_running_mode=multi_processing (or "
            "in_memory, the default)."
        )
    return beam.Pipeline(options=options)


def _is_remote(path: str) -> bool:
    return "://" in path


def _non_empty(path: str) -> bool:
    if _is_remote(path):
        return bool(FileSystems.match([FileSystems.join(path, "*")])[0].metadata_list)
    return os.path.isdir(path) and bool(os.listdir(path))


def run_job(config: FeatureJobConfig, beam_args: Sequence[str] = ()) -> dict:
    """Runs the job to completion and returns the ``dataset_info.json`` it wrote, plus the
    job's Beam counters under ``"counters"`` (empty where the runner does not report them).

    Raises ValueError if the output folder is not empty and ``config.overwrite`` is False.
    """
    out = config.output_dir
    if not _is_remote(out):
        out = config.output_dir = os.path.abspath(out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise UserInputError(f"Output path exists and is not a folder: {out}")
    for manifest in config.manifests:
        if not _is_remote(manifest) and not os.path.exists(manifest):
            raise FileNotFoundError(f"Manifest not found: {manifest}")
    if _non_empty(out) and not config.overwrite:
        raise UserInputError(
            f"Output folder {out} is not empty; choose another --out or pass --overwrite."
        )
    options = pipeline_options(beam_args)

    if _is_remote(out):
        if config.overwrite and _non_empty(out):
            old = FileSystems.match([FileSystems.join(out, "*")])[0].metadata_list
            FileSystems.delete([m.path for m in old])
        counters = _run(make_pipeline(options), config, out, beam_args)
        _remove_sink_leftovers(out)
        return {**_read_info(out), "counters": counters}

    # Local output: the job writes into a staging folder that replaces `out` only once the job
    # has finished (a killed job leaves `out` as it was).
    with files.atomic_directory(out, replace=True) as staging:
        counters = _run(make_pipeline(options), config, str(staging), beam_args)
        _read_info(str(staging))
        _remove_sink_leftovers(str(staging))
    return {**_read_info(out), "counters": counters}


def _remove_sink_leftovers(output_dir: str) -> None:
    """Deletes the file sinks' ``beam-temp-*`` folders if the runner left them. Beam's
    DaskRunner (2.77) computes side inputs by running their branch of the graph again, so the
    sinks write extra temporary copies, and it computes only the branch that ends in the job's
    last step, so their clean-up never runs (measured: three temporary folders, one holding a
    shard's copy, beside the right final shards)."""
    if not _is_remote(output_dir):
        for path in glob.glob(os.path.join(output_dir, "beam-temp-*")):
            shutil.rmtree(path, ignore_errors=True)
        return
    found = FileSystems.match([FileSystems.join(output_dir, "beam-temp-*", "*")])[0].metadata_list
    if found:
        FileSystems.delete([m.path for m in found])


def _run(p: beam.Pipeline, config: FeatureJobConfig, output_dir: str, beam_args) -> dict:
    """Runs the job; returns its Beam counters where the runner reports them."""
    build_pipeline(p, config, output_dir, beam_args)
    result = p.run()
    result.wait_until_finish()
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except (NotImplementedError, AttributeError):
        return {}
    counters: dict = {}
    for counter in query["counters"]:  # one per step; a name can be counted by several steps
        name = counter.key.metric.name
        counters[name] = counters.get(name, 0) + (counter.committed or 0)
    return dict(sorted(counters.items()))


def _read_info(path: str) -> dict:
    with FileSystems.open(FileSystems.join(path, DATASET_INFO)) as f:
        return json.loads(f.read().decode("utf-8"))


def _parse_list(text: str | None, kind, flag: str, example: str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(kind(r) for r in text.split(",") if r.strip())
    except ValueError as e:
        raise UserInputError(f"{flag} takes comma-separated {example}: {text!r}") from e


def parse_rates(text: str | None) -> tuple[float, ...]:
    return _parse_list(text, float, "--speed-perturb", "rates like 0.9,1.1")


def parse_narrowband(text: str | None) -> tuple[int, ...]:
    return _parse_list(text, int, "--narrowband", "sample rates in Hz like 8000")


def config_from_args(args: argparse.Namespace) -> FeatureJobConfig:
    labels = CharTokenizer.from_file(args.labels).labels if args.labels else ENGLISH_LABELS
    return FeatureJobConfig(
        manifests=list(args.manifests),
        output_dir=args.out,
        shards=args.shards,
        speed_perturb=parse_rates(args.speed_perturb),
        narrowband=parse_narrowband(args.narrowband),
        era=args.era,
        max_duration=args.max_duration,
        oov=args.oov,
        compression=args.compression,
        labels=tuple(labels),
        featurize_threads=args.featurize_threads,
        intra_op_threads=args.intra_op_threads,
        overwrite=args.overwrite,
    )


def run(argv: Sequence[str] | None = None) -> dict:
    """Entry point: the job's flags, everything else to ``PipelineOptions``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    start = time.monotonic()
    info = run_job(config_from_args(args), beam_args)
    logger.info(
        "Wrote %d utterances (%.2f h), %d failed, in %.1f s",
        info["num_utterances"],
        info["hours"],
        info["num_failed"],
        time.monotonic() - start,
    )
    return info


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    run()
