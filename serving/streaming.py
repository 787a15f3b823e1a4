"""Streaming in the serving formats: the SavedModel's ``stream_step`` signature, the TFLite
streaming model, and a :class:`~qn_keras.streaming.recognizer.StreamingRecognizer` over any
:class:`~serving.recognizer.Recognizer` (model folder or export).

``stream_step`` (exported for models trained with a ``lookahead`` that have a feature prior)
takes ``audio`` float32 ``[batch, samples]`` (a multiple of the export's
``streaming.granule_samples``), ``state`` float32 ``[batch, state_size]``, ``counters`` int32
``[batch, 3]``, ``end`` int32 ``[batch]`` (the stream's total samples from the call holding its
last audio on, else -1) and ``text`` string ``[batch]`` (the transcript so far), and returns the
new ``state``, ``counters`` and ``text`` with the step's ``logprobs``, ``valid``,
``first_frame`` and ``emitted`` (see :class:`~qn_keras.streaming.stateful.StreamingModel`).
The client keeps the state, so any TF Serving replica can take any step of any stream, and a
client that disappears leaves nothing behind on the server. Zeros start a stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras import files
from qn_keras import tflite as lite
from qn_keras.errors import UserInputError
from qn_keras.streaming.normalization import DEFAULT_PRIOR_FRAMES, prior_from_metadata
from qn_keras.streaming.recognizer import (
    BufferedEngine,
    StatefulEngine,
    StreamingRecognizer,
    StreamSettings,
)
from qn_keras.streaming.stateful import COUNTERS, StreamingModel

STREAM_SIGNATURE = "stream_step"
STREAM_INPUTS = ("audio", "state", "counters", "end", "text")
STREAM_OUTPUTS = ("logprobs", "valid", "first_frame", "emitted", "state", "counters", "text")
TFLITE_STREAM_FILE = "stream_float32.tflite"
TFLITE_STREAM_INFO = "stream_float32.json"
DEFAULT_TFLITE_CHUNK_SECONDS = 1.0


def stream_model_for(bundle, check: bool = True) -> StreamingModel | None:
    """The bundle's stream step, or None when the model has no look-ahead limit (or, with a
    front end that normalizes per utterance, no feature prior: then adaptive normalization
    from the folder's prior)."""
    if getattr(bundle.model, "lookahead", None) is None:
        return None
    if bundle.featurizer.causal:  # trained for streaming: its front end's own normalization
        return StreamingModel(bundle.model, bundle.featurizer_layer(), check=check)
    prior = prior_from_metadata(bundle.metadata)
    if prior is None:
        return None
    return StreamingModel(
        bundle.model, bundle.featurizer_layer(), prior, DEFAULT_PRIOR_FRAMES, check=check
    )


def stream_specs(state_size: int | None, batch: int | None = None, samples: int | None = None):
    """The step's inputs; ``state_size`` None leaves the state's width free (an empty state
    starts a stream; a wrong width is refused by the step's own check)."""
    return [
        tf.TensorSpec([batch, samples], tf.float32, name="audio"),
        tf.TensorSpec([batch, state_size], tf.float32, name="state"),
        tf.TensorSpec([batch, COUNTERS], tf.int32, name="counters"),
        tf.TensorSpec([batch], tf.int32, name="end"),
    ]


def text_step_function(streamer: StreamingModel, labels):
    """``stream_step`` with the transcript carried in and out (strings: SavedModel only)."""
    table = tf.constant(list(labels))

    def stream_step(audio, state, counters, end, text):
        out = streamer.step(audio, state, counters, end)
        emitted = out["emitted"]
        chars = tf.where(emitted >= 0, tf.gather(table, tf.maximum(emitted, 0)), "")
        out["text"] = text + tf.strings.reduce_join(chars, axis=1)
        return out

    specs = stream_specs(None)
    specs.append(tf.TensorSpec([None], tf.string, name="text"))
    return tf.function(stream_step, input_signature=specs)


def stream_metadata(streamer: StreamingModel) -> dict:
    return {
        **streamer.info(),
        "signature": STREAM_SIGNATURE,
        "inputs": list(STREAM_INPUTS),
        "outputs": list(STREAM_OUTPUTS),
    }


def stream_warmup_inputs(streamer: StreamingModel) -> dict:
    state, counters = streamer.initial_state(1)
    return {
        "audio": np.zeros([1, streamer.granule * 5], np.float32),
        "state": state,
        "counters": counters,
        "end": np.array([-1], np.int32),
        "text": np.array([b""]),
    }


# TFLite -----------------------------------------------------------------------------------


def convert_stream_tflite(bundle, out_dir, chunk_seconds: float = DEFAULT_TFLITE_CHUNK_SECONDS):
    """Writes ``out_dir/stream_float32.tflite`` (batch 1, fixed chunk) and its
    ``stream_float32.json`` (what :class:`TFLiteStreamStep` needs); returns the model path."""
    streamer = stream_model_for(bundle, check=False)
    if streamer is None:
        raise UserInputError(
            "Only a model trained with a lookahead (and a feature prior) has a streaming TFLite "
            "model."
        )
    chunk = max(1, round(chunk_seconds * bundle.featurizer.sample_rate / streamer.granule))
    chunk *= streamer.granule
    function = tf.function(
        streamer.step, input_signature=stream_specs(streamer.state_size, 1, chunk)
    ).get_concrete_function()
    blob = lite.convert_function(function, streamer, "float32")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = files.write_bytes(out_dir / TFLITE_STREAM_FILE, blob)
    files.write_json(out_dir / TFLITE_STREAM_INFO, {**streamer.info(), "chunk_samples": chunk})
    return path


class TFLiteStreamStep:
    """A streaming ``.tflite`` as a stream step (``step(audio, state, counters, end)``), with
    the checks the SavedModel makes in its graph made here."""

    def __init__(self, path, num_threads: int | None = None, engine: str = "xnnpack"):
        path = Path(path)
        info_path = path.with_suffix(".json")
        if not info_path.is_file():
            raise UserInputError(f"{info_path} is missing: {path} is not a qn streaming model.")
        self.info = json.loads(info_path.read_text())
        self.interpreter = lite.interpreter(path, num_threads, engine)
        self.runner = self.interpreter.get_signature_runner()
        self.chunk = int(self.info["chunk_samples"])

    def __call__(self, audio, state, counters, end) -> dict:
        audio = np.asarray(audio, np.float32)
        state = np.asarray(state, np.float32)
        counters = np.asarray(counters, np.int32)
        if audio.shape != (1, self.chunk):
            raise UserInputError(
                f"This streaming TFLite model takes chunks of {self.chunk} samples; "
                f"received {audio.shape[1:]}."
            )
        if state.shape != (1, self.info["state_size"]):
            raise UserInputError(
                f"state must be [1, {self.info['state_size']}] for this model; received "
                f"{list(state.shape)}."
            )
        if counters[0, 1] and counters[0, 0] != self.info["tag"]:
            raise UserInputError("The stream state was made by another model: start a new stream.")
        if not np.all(np.isfinite(audio)):
            raise UserInputError("audio has non-finite samples")
        # The converter names a concrete function's inputs after its arguments.
        return self.runner(
            audio=audio, state=state, counters=counters, end=np.asarray(end, np.int32)
        )


# Recognizers --------------------------------------------------------------------------------


def streaming_recognizer(recognizer, settings: StreamSettings | None = None):
    """A :class:`StreamingRecognizer` over a :class:`~serving.recognizer.Recognizer`: stateful
    when the model can (the bundle's stream step, or an export's ``stream_step``), buffered
    otherwise or when ``settings.mode`` says so."""
    settings = settings or StreamSettings()
    if recognizer.bundle is not None:
        return StreamingRecognizer.from_bundle(recognizer.bundle, settings)
    meta = recognizer.export_meta or {}
    step = getattr(recognizer.owner, "signatures", {}).get(STREAM_SIGNATURE)
    info = meta.get("streaming")
    mode = settings.mode
    if mode == "auto":
        mode = "stateful" if step is not None and info else "buffered"
    if mode == "stateful":
        if step is None or not info:
            raise UserInputError(
                f"{recognizer.source} has no stream_step: only models trained with a "
                "lookahead (and exported with a feature prior) stream with state; use "
                "--stream-mode buffered."
            )
        rule = info.get("normalization", "adaptive")
        if settings.normalization not in (None, rule):
            raise UserInputError(f"This export's stream_step normalizes with {rule!r}.")

        def call(audio, state, counters, end):
            return step(
                audio=audio,
                state=state,
                counters=counters,
                end=end,
                text=tf.constant([""] * len(audio)),
            )

        engine = StatefulEngine(call, info, recognizer.featurizer, settings)
    else:
        prior = prior_from_metadata(meta.get("metadata", {}))
        engine = BufferedEngine(
            recognizer.log_mel,
            recognizer.encode,
            recognizer.featurizer,
            recognizer.stride,
            settings,
            prior,
        )
    engine.owner = recognizer  # its functions hold the loaded SavedModel only weakly
    return StreamingRecognizer(engine, recognizer.labels, settings)
