"""Helpers for the training tests: learnable synthetic feature data and tiny models."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORDS = ("one", "two", "six", "ten", "owe", "tin")

# A 4-block QuartzNet-shaped model small enough to train in seconds on a CPU.
TINY_MODEL = {
    "preset": None,
    "blocks": {
        "stackwise_filters": [32, 32, 48, 64],
        "stackwise_kernel_sizes": [11, 11, 13, 1],
        "stackwise_strides": [2, 1, 1, 1],
        "stackwise_dilations": [1, 1, 1, 1],
        "stackwise_repeats": [1, 2, 1, 1],
        "stackwise_residual": [False, True, False, False],
        "stackwise_separable": [True, True, True, False],
    },
}


def tiny_config(**sections):
    """A TrainConfig dict for tests: tiny model, small batches, no augmentation."""
    config = {
        "model": TINY_MODEL,
        "optimizer": {"learning_rate": 0.02},
        "schedule": {"name": "constant"},
        "augment": {"rect_masks": 0},
        "data": {"batch_size": 4, "eval_batch_size": 8, "bucket_boundaries": None},
        "training": {"epochs": 1, "checkpoint_every_steps": 1000, "log_every_steps": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def synthetic_utterance(text, rng, frames_per_char=5, num_mels=64):
    """Features in which every character has its own pattern (a learnable toy task)."""
    from qn_keras.tokenizer import CharTokenizer

    ids = CharTokenizer().encode(text)
    rows = [rng.normal(0, 0.3, size=(3, num_mels))]
    for i in ids:
        seg = rng.normal(0, 0.3, size=(frames_per_char, num_mels))
        seg[:, (2 * i) % num_mels] += 3.0
        seg[:, (2 * i + 17) % num_mels] += 2.0
        rows.append(seg)
        rows.append(rng.normal(0, 0.3, size=(2, num_mels)))
    return np.concatenate(rows).astype(np.float32), ids


def write_synthetic_tfrecord(path, num_utterances, seed=0):
    """A TFRecord of synthetic utterances of one or two words; returns the transcripts."""
    import tensorflow as tf

    from qn_keras.data import schema

    rng = np.random.default_rng(seed)
    texts = []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for n in range(num_utterances):
            words = rng.choice(WORDS, size=int(rng.integers(1, 3)))
            text = " ".join(words)
            features, ids = synthetic_utterance(text, rng)
            writer.write(
                schema.serialize_utterance(
                    features, ids, text, len(features) * 0.01, f"utt{n}", "synthetic"
                )
            )
            texts.append(text)
    return texts


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free 127.0.0.1 port for a server that must be told its port before it starts
    (TF_CONFIG's workers, Keras Tuner's oracle): TensorFlow's gRPC server cannot share a port
    held for it, so the port is checked free and released.

    Binding port 0 would race with every process that asks the OS for an ephemeral port
    between this check and the server's bind. Ports below the ephemeral range are never handed
    out that way, so only a process asking for this very port could take it; picked at random,
    two tests of this suite are unlikely to, and the bind check excludes ports in use."""
    low = max(_ephemeral_range()[0], 10001)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range on 127.0.0.1")


def run_python(code: str, env_extra=None, timeout=240, **popen):
    """Runs ``code`` in a fresh Python (so TensorFlow starts with its own device setup)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        **popen,
    )


def write_json(path, data):
    Path(path).write_text(json.dumps(data))
