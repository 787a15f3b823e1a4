"""Which ``tf.distribute`` strategy a run uses, and each worker's role in it."""

from __future__ import annotations

import json
import os

import tensorflow as tf


def make_strategy(devices=None) -> tf.distribute.Strategy:
    """``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names several tasks, otherwise
    ``MirroredStrategy`` over ``devices`` (default: every visible GPU, or the CPU)."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = tf_config.get("cluster", {})
    tasks = sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
    if tasks > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy(devices)


def strategy_name(strategy) -> str:
    """The public ``tf.distribute`` name (MultiWorkerMirroredStrategy's class is
    ``CollectiveAllReduceStrategy``)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def worker_role(strategy) -> tuple[bool, str]:
    """(is_chief, a name for this worker's private files)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if task_type is None:
        return True, "chief"
    has_chief = "chief" in (resolver.cluster_spec().as_dict() if resolver else {})
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return chief, f"{task_type}_{task_id}"


def any_worker(strategy, flag: bool) -> bool:
    """True if any replica passes True, so that every worker takes the same decision."""
    if strategy.num_replicas_in_sync == 1:
        return flag

    def replica_fn(value):
        return tf.distribute.get_replica_context().all_reduce("sum", value)

    total = strategy.run(replica_fn, args=(tf.constant(float(flag)),))
    return float(strategy.experimental_local_results(total)[0]) > 0
