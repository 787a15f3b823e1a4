"""Exports a model folder as a TF Serving model: ``BASE/NAME/VERSION/`` plus server config.

Layout written by :func:`export_model`::

    BASE/NAME/
      models.config              TF Serving --model_config_file (base_path /models/NAME)
      batching_parameters.txt    TF Serving --batching_parameters_file
      3/                         integer version folders, as TF Serving expects
        saved_model.pb, variables/
        assets.extra/tf_serving_warmup_requests   PredictionLog records TF Serving replays
        assets.extra/qn_export.json               labels, featurizer, frame duration

Signatures (see :class:`ServingModule`):

- ``serving_default``: ``waveform`` float32 ``[batch, samples]`` at 16 kHz and ``lengths``
  int32 ``[batch]`` in; ``transcripts`` string ``[batch]``, ``logprobs`` float32
  ``[batch, frames, vocabulary]`` and ``logprob_lengths`` int32 ``[batch]`` out.
- ``transcribe_wav``: ``wav_bytes`` string ``[batch]`` (whole WAV files: PCM 8/16/24/32-bit or
  float, any rate, any channel count) in, the same outputs.
- ``stream_step`` (models trained with a ``lookahead``): one chunk of live audio and the
  client-held stream state in, log-probs, text so far and the new state out
  (:mod:`serving.streaming`); with TFLite modes also ``tflite/stream_float32.tflite``.

Everything runs in the graph with stock TensorFlow ops (checked against :data:`STOCK_OPS`
after saving), so the version folder serves unchanged in the official ``tensorflow/serving``
image. The version folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras import files
from qn_keras.errors import UserInputError
from qn_keras.inference import SpeechRecognizer
from serving.layout import METADATA_FILE, TFLITE_DIR, WARMUP_FILE, existing_versions
from serving.wav import decode_wav_batch

WAV_INPUT = "wav_bytes"
SIGNATURES = ("serving_default", "transcribe_wav")
OUTPUTS = ("transcripts", "logprobs", "logprob_lengths")
MODELS_CONFIG = "models.config"
BATCHING_FILE = "batching_parameters.txt"
EXPORT_FORMAT = "qn-keras-serving"

# Ops of the exported graphs (functions included) for the model presets and for the
# quantization-aware models of `qn optimize qat` (FakeQuant*), all registered by core
# TensorFlow, so every stock tensorflow_model_server build has kernels for them. Anything else
# (tensorflow-io's "IO>..." ops, tensorflow-addons' "Addons>..." ops, user custom ops) makes
# the export fail instead of failing later inside TF Serving.
STOCK_OPS = frozenset(
    """
    Abs Add AddN AddV2 All Any ArgMax AsString Assert AssignVariableOp BatchMatMulV2
    BatchToSpaceND BesselI0 BiasAdd BroadcastTo Case Cast Ceil ConcatV2 Const Conv2D Cos Cumsum
    DecodeRaw DepthwiseConv2dNative DisableCopyOnRead Equal Exp ExpandDims Fill Floor FloorDiv
    FakeQuantWithMinMaxVars FakeQuantWithMinMaxVarsPerChannel
    FloorMod FusedBatchNormV3 GatherV2 Greater GreaterEqual Identity IdentityN If Imag IsFinite
    Less LessEqual Log LogSoftmax LogicalAnd LogicalNot LogicalOr MatMul Max Maximum Mean
    MergeV2Checkpoints Min Minimum Mul Neg NoOp NotEqual OnesLike Pack Pad PadV2
    PartitionedCall Placeholder Prod RFFT RaggedTensorFromVariant RaggedTensorToTensor
    RaggedTensorToVariant Range ReadVariableOp Real RealDiv ReduceJoin Relu Reshape RestoreV2
    ReverseV2 Rsqrt SaveV2 Select SelectV2 Shape ShardedFilename Sigmoid Sin Size Slice Softmax
    SpaceToBatchND SplitV Sqrt Square Squeeze StatefulPartitionedCall StatelessCase StatelessIf
    StatelessWhile StaticRegexFullMatch StridedSlice StringJoin StringLength Sub Substr Sum
    TensorListConcatV2 TensorListFromTensor TensorListGetItem TensorListReserve
    TensorListSetItem TensorListStack Tile Transpose TruncateDiv Unpack VarHandleOp Where
    While ZerosLike
    """.split()
)


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's server-side batching (``--enable_batching``) settings.

    Variable-length waveforms need ``pad_variable_length_inputs``: TF Serving pads them with
    zeros to the longest in the batch, which is harmless because ``lengths`` travels along.
    """

    max_batch_size: int = 8
    batch_timeout_micros: int = 20000
    max_enqueued_batches: int = 64
    num_batch_threads: int = 2
    allowed_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    pad_variable_length_inputs: bool = True

    def to_text(self) -> str:
        lines = [
            f"max_batch_size {{ value: {self.max_batch_size} }}",
            f"batch_timeout_micros {{ value: {self.batch_timeout_micros} }}",
            f"max_enqueued_batches {{ value: {self.max_enqueued_batches} }}",
            f"num_batch_threads {{ value: {self.num_batch_threads} }}",
            *(f"allowed_batch_sizes: {size}" for size in self.allowed_batch_sizes),
            f"pad_variable_length_inputs: {str(self.pad_variable_length_inputs).lower()}",
        ]
        return "\n".join(lines) + "\n"


class ServingModule(SpeechRecognizer):
    """:class:`SpeechRecognizer` plus the ``transcribe_wav`` signature (WAV bytes in).

    WAV parsing and resampling to the model's rate happen in the graph
    (:mod:`serving.wav`), so clients can send files as they are. A file that is not a
    supported WAV file fails with InvalidArgumentError naming the problem and the batch item;
    audio too short to transcribe, or non-finite (float WAVs can hold NaN), fails through the
    checks of ``serving_default``.
    """

    def __init__(self, bundle, name=None, precision: str = "float32"):
        super().__init__(bundle, name=name, precision=precision)
        from serving.streaming import stream_model_for, text_step_function

        # Models trained with a lookahead also get the stream_step signature.
        self.streamer = stream_model_for(bundle)
        if self.streamer is not None:
            self.stream_step = text_step_function(self.streamer, self.labels)
            # The stream step runs the Keras layers themselves.
            self.model_variables = list(bundle.model.variables)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=WAV_INPUT)])
    def transcribe_wav(self, wav_bytes):
        waveform, lengths = decode_wav_batch(wav_bytes, self.sample_rate)
        return self.serving_default(waveform, lengths)


def serving_signatures(module: ServingModule) -> dict:
    signatures = {
        "serving_default": module.serving_default.get_concrete_function(),
        "transcribe_wav": module.transcribe_wav.get_concrete_function(),
    }
    if module.streamer is not None:
        signatures["stream_step"] = module.stream_step.get_concrete_function()
    return signatures


def saved_model_ops(path) -> set[str]:
    """Every op type in a SavedModel's graphs, including all library functions."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def check_stock_ops(path) -> None:
    """Raises ValueError naming every op of the SavedModel that is not in :data:`STOCK_OPS`."""
    unknown = sorted(saved_model_ops(path) - STOCK_OPS)
    if unknown:
        raise UserInputError(
            f"The SavedModel at {path} uses ops outside stock TensorFlow's allowlist: "
            f"{', '.join(unknown)}. Stock TF Serving may lack kernels for them (ops from "
            "tensorflow-io or tensorflow-addons); replace them with core TensorFlow ops."
        )


def _synthetic_waveform(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    # A gliding tone in light noise: exercises every graph path; the content does not matter.
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)
    return (tone + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def encode_wav(waveform: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """Encodes a float waveform (``[samples]`` or ``[samples, channels]``) as WAV bytes."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(waveform), sample_rate, subtype=subtype, format="WAV")
    return buffer.getvalue()


def warmup_requests(model_name: str, sample_rate: int, streamer=None) -> list:
    """PredictRequests for both signatures: TF Serving runs them before serving traffic, so
    the first real request does not pay for graph initialization."""
    from tensorflow_serving.apis import predict_pb2

    waveform = _synthetic_waveform(1.0, sample_rate)
    default = predict_pb2.PredictRequest()
    default.model_spec.name = model_name
    default.model_spec.signature_name = "serving_default"
    default.inputs["waveform"].CopyFrom(tf.make_tensor_proto(waveform[None, :]))
    default.inputs["lengths"].CopyFrom(
        tf.make_tensor_proto(np.array([len(waveform)], dtype=np.int32))
    )
    wav = predict_pb2.PredictRequest()
    wav.model_spec.name = model_name
    wav.model_spec.signature_name = "transcribe_wav"
    files = [encode_wav(waveform, sample_rate), encode_wav(_synthetic_waveform(0.5, 44100), 44100)]
    wav.inputs[WAV_INPUT].CopyFrom(tf.make_tensor_proto(files, dtype=tf.string))
    requests = [default, wav]
    if streamer is not None:
        from serving.streaming import STREAM_SIGNATURE, stream_warmup_inputs

        stream = predict_pb2.PredictRequest()
        stream.model_spec.name = model_name
        stream.model_spec.signature_name = STREAM_SIGNATURE
        for key, value in stream_warmup_inputs(streamer).items():
            stream.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        requests.append(stream)
    return requests


def write_warmup_file(path, requests) -> None:
    from tensorflow_serving.apis import prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def read_warmup_file(path) -> list:
    """The PredictRequests of a ``tf_serving_warmup_requests`` file."""
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    for record in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        requests.append(log.predict_log.request)
    return requests


def models_config_text(name: str, container_base: str = "/models") -> str:
    """TF Serving ``--model_config_file`` text for one model served at its latest version."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = f"{container_base.rstrip('/')}/{name}"
    model.model_platform = "tensorflow"
    model.model_version_policy.latest.num_versions = 1
    return text_format.MessageToString(config)


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise UserInputError(
            f"Model name {name!r} must start with a letter or digit and contain only letters, "
            "digits, '_', '.' and '-' (it becomes a folder and a URL path segment)."
        )


def export_model(
    bundle,
    export_base,
    name: str,
    version: int | None = None,
    *,
    batching: BatchingParameters | None = None,
    warmup: bool = True,
    tflite_modes: tuple[str, ...] = (),
    precision: str = "float32",
) -> Path:
    """Writes ``export_base/name/version/`` (next free version by default) and the server
    config beside it; returns the version folder. Existing versions are never overwritten.

    ``tflite_modes`` (from :data:`serving.tflite.MODES`) also writes
    ``version/tflite/<mode>.tflite``; TF Serving ignores that folder. ``precision="bfloat16"``
    runs the encoder in bfloat16 (CPUs with AVX512-BF16 or AMX; refused elsewhere), for
    speed at a small cost in accuracy (BENCHMARKS.md "Inference"); the default is float32.
    """
    _check_name(name)
    from serving.tflite import MODES

    unknown = [m for m in tflite_modes if m not in MODES]
    if unknown:
        raise UserInputError(f"Unknown TFLite mode(s) {unknown}; choose from {', '.join(MODES)}.")
    model_base = Path(export_base) / name
    model_base.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = (existing_versions(model_base) or [0])[-1] + 1
    if int(version) < 1:
        raise UserInputError(f"--version must be a positive integer. Received: {version}")
    target = model_base / str(int(version))
    if target.exists():
        raise FileExistsError(
            f"Version {version} already exists at {target}; pass another --version or leave it "
            "out to take the next free one."
        )
    # The version folder appears whole or not at all; rename() refuses a non-empty target, so
    # two concurrent exports cannot both win.
    with files.atomic_directory(target) as tmp:
        module = ServingModule(bundle, precision=precision)
        tf.saved_model.save(module, str(tmp), signatures=serving_signatures(module))
        check_stock_ops(tmp)
        extra = tmp / "assets.extra"
        extra.mkdir()
        if warmup:
            requests = warmup_requests(name, module.sample_rate, module.streamer)
            write_warmup_file(extra / WARMUP_FILE, requests)
        meta = {
            "format": EXPORT_FORMAT,
            "name": name,
            "version": int(version),
            "labels": list(bundle.tokenizer.labels),
            "featurizer": bundle.featurizer.to_dict(),
            "output_frame_seconds": module.stride
            * bundle.featurizer.hop_length
            / bundle.featurizer.sample_rate,
            "signatures": {
                "serving_default": {"inputs": ["waveform", "lengths"], "outputs": list(OUTPUTS)},
                "transcribe_wav": {"inputs": [WAV_INPUT], "outputs": list(OUTPUTS)},
            },
            "metadata": bundle.metadata,
            # "rewritten" (qn_keras.inference_graph) or why the Keras graph is served as is.
            "encoder_graph": module.rewrite_refused or "rewritten",
            "precision": precision,
        }
        if module.streamer is not None:
            from serving.streaming import stream_metadata

            meta["streaming"] = stream_metadata(module.streamer)
            meta["signatures"]["stream_step"] = {
                "inputs": meta["streaming"]["inputs"],
                "outputs": meta["streaming"]["outputs"],
            }
        files.write_json(extra / METADATA_FILE, meta)
        if tflite_modes:
            from serving.tflite import convert_tflite

            convert_tflite(bundle, tmp / TFLITE_DIR, tflite_modes)
            if module.streamer is not None:
                from serving.streaming import convert_stream_tflite

                convert_stream_tflite(bundle, tmp / TFLITE_DIR)
    files.write_text(model_base / MODELS_CONFIG, models_config_text(name))
    files.write_text(model_base / BATCHING_FILE, (batching or BatchingParameters()).to_text())
    return target
