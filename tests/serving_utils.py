"""Shared, cached fixtures for the serving tests: one tiny random model, its model folder and
one export, built once per pytest process however many serving test files run."""

from __future__ import annotations

import atexit
import functools
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DEV = REPO / "sample_data" / "dev.json"
MODEL_NAME = "qn"

# QuartzNet-shaped (C1 stride 2, a residual B-block, a dilated C2, C3) but tiny: random
# weights are enough for parity, which compares implementations, not accuracy.
TINY_BLOCKS = {
    "stackwise_filters": [32, 32, 48, 64],
    "stackwise_kernel_sizes": [11, 7, 9, 1],
    "stackwise_strides": [2, 1, 1, 1],
    "stackwise_dilations": [1, 1, 2, 1],
    "stackwise_repeats": [1, 2, 1, 1],
    "stackwise_residual": [False, True, False, False],
    "stackwise_separable": [True, True, True, False],
}


@functools.cache
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="qn-serving-tests-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def randomize_batch_norm(model, seed: int) -> None:
    """Non-trivial BatchNorm statistics, so that inference-mode BN is exercised."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    gamma * rng.uniform(0.8, 1.2, gamma.shape),
                    beta + rng.normal(0, 0.1, beta.shape),
                    mean + rng.normal(0, 0.1, mean.shape),
                    var * rng.uniform(0.5, 1.5, var.shape),
                ]
            )


@functools.cache
def tiny_bundle():
    import tensorflow as tf

    from qn_keras.featurizer import FeaturizerConfig
    from qn_keras.model_dir import ModelBundle
    from qn_keras.quartznet_ctc import QuartzNetCTC
    from qn_keras.tokenizer import CharTokenizer

    tf.keras.utils.set_random_seed(7)
    model = QuartzNetCTC(vocabulary_size=29, name="tiny", **TINY_BLOCKS)
    # Larger head weights make the random model's per-frame argmax decisive, so float
    # rounding differences between runtimes do not flip characters.
    kernel, bias = model.get_layer("ctc_head_conv").get_weights()
    model.get_layer("ctc_head_conv").set_weights([kernel * 2.0, bias])
    randomize_batch_norm(model, 7)
    return ModelBundle(model, CharTokenizer(), FeaturizerConfig(), metadata={"test": True})


@functools.cache
def model_dir() -> Path:
    from qn_keras.model_dir import save_model_dir

    return save_model_dir(workdir() / "model", tiny_bundle(), serving=False)


@functools.cache
def export_dir() -> Path:
    """BASE/qn/1 exported through the CLI, with all three TFLite variants."""
    from qn_cli.main import main

    base = workdir() / "exports"
    argv = ["export", "--model", str(model_dir()), "--out", str(base), "--name", MODEL_NAME]
    argv += ["--tflite", "float32", "float16", "dynamic"]
    assert main(argv) == 0
    return base / MODEL_NAME / "1"


@functools.cache
def loaded_export():
    import tensorflow as tf

    return tf.saved_model.load(str(export_dir()))


@functools.cache
def keras_reference():
    """The in-memory Keras model behind a plain function: waveforms -> (logprobs, lengths)."""
    bundle = tiny_bundle()
    featurizer = bundle.featurizer_layer()

    def run(batch: np.ndarray, lengths: np.ndarray):
        features, feature_lengths = featurizer(batch, lengths, training=False)
        logprobs, out_lengths = bundle.model([features, feature_lengths], training=False)
        return logprobs.numpy(), out_lengths.numpy()

    return run


def sample_items(count: int = 8) -> list[dict]:
    """The first utterances of the project's own sample corpus (absolute paths)."""
    lines = [json.loads(line) for line in SAMPLE_DEV.read_text().splitlines() if line.strip()]
    for line in lines:
        line["audio_filepath"] = str(SAMPLE_DEV.parent / line["audio_filepath"])
    return lines[:count]


def sample_paths(count: int = 8) -> list[str]:
    return [item["audio_filepath"] for item in sample_items(count)]


@functools.cache
def sample_waveforms(count: int = 8) -> tuple:
    from qn_keras.audio import decode_audio

    return tuple(decode_audio(item["audio_filepath"]) for item in sample_items(count))


def pad(waveforms) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(w) for w in waveforms], dtype=np.int32)
    batch = np.zeros((len(waveforms), lengths.max()), dtype=np.float32)
    for row, waveform in zip(batch, waveforms, strict=True):
        row[: len(waveform)] = waveform
    return batch, lengths


def greedy_texts(logprobs: np.ndarray, lengths: np.ndarray) -> list[str]:
    from qn_keras.decoding import greedy_decode_ids
    from qn_keras.tokenizer import CharTokenizer

    tokenizer = CharTokenizer()
    return [
        tokenizer.decode(greedy_decode_ids(lp, n, tokenizer.blank_id))
        for lp, n in zip(logprobs, lengths, strict=True)
    ]


def wav_file_bytes(waveform: np.ndarray, rate: int, subtype: str) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, waveform, rate, subtype=subtype, format="WAV")
    return buffer.getvalue()
