"""Dataset figures computed inside the job (so every runner gets them, whether or not it
reports metrics back): counts, hours and a length histogram of what was written, and failure
counts by reason. They go to ``dataset_info.json``."""

from __future__ import annotations

import collections

import apache_beam as beam

from qn_keras.data.dataset_info import HISTOGRAM_BIN_FRAMES, length_histogram


class DatasetStatsFn(beam.CombineFn):
    """``(num_frames, duration_seconds, is_source)`` per written utterance -> summary dict
    (``is_source``: not a speed-perturbed or narrowband copy)."""

    def create_accumulator(self):
        return {
            "utterances": 0,
            "source_utterances": 0,
            "seconds": 0.0,
            "source_seconds": 0.0,
            "frames": 0,
            "min_frames": None,
            "max_frames": None,
            "histogram": collections.Counter(),
        }

    def add_input(self, acc, element):
        frames, seconds, is_source = element
        acc["utterances"] += 1
        acc["seconds"] += seconds
        acc["frames"] += frames
        if is_source:
            acc["source_utterances"] += 1
            acc["source_seconds"] += seconds
        acc["min_frames"] = frames if acc["min_frames"] is None else min(acc["min_frames"], frames)
        acc["max_frames"] = frames if acc["max_frames"] is None else max(acc["max_frames"], frames)
        acc["histogram"][frames // HISTOGRAM_BIN_FRAMES] += 1
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            for key in ("utterances", "source_utterances", "seconds", "source_seconds", "frames"):
                merged[key] += acc[key]
            for key, pick in (("min_frames", min), ("max_frames", max)):
                values = [v for v in (merged[key], acc[key]) if v is not None]
                merged[key] = pick(values) if values else None
            merged["histogram"].update(acc["histogram"])
        return merged

    def extract_output(self, acc):
        return {
            "num_utterances": acc["utterances"],
            "num_source_utterances": acc["source_utterances"],
            "hours": acc["seconds"] / 3600.0,
            "source_hours": acc["source_seconds"] / 3600.0,
            "total_frames": acc["frames"],
            "min_frames": acc["min_frames"],
            "max_frames": acc["max_frames"],
            "mean_frames": acc["frames"] / acc["utterances"] if acc["utterances"] else None,
            "length_histogram": length_histogram(acc["histogram"]),
        }


class CountByReasonFn(beam.CombineFn):
    """Failure records -> ``{reason: count}``, sorted by reason."""

    def create_accumulator(self):
        return collections.Counter()

    def add_input(self, acc, element):
        acc[element.reason] += 1
        return acc

    def merge_accumulators(self, accumulators):
        merged = collections.Counter()
        for acc in accumulators:
            merged.update(acc)
        return merged

    def extract_output(self, acc):
        return dict(sorted(acc.items()))
