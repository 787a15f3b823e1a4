"""Clients for TF Serving's REST and gRPC predict APIs (and ``qn serve``, which speaks both).

Each client separates the three steps, so each can be tested and reused on its own:

1. build the request (pure functions: :func:`build_rest_request`, :func:`build_grpc_request`),
2. send it (:meth:`RestClient.predict`, :meth:`GrpcClient.predict`: timeout, and a
   :class:`ServingError` carrying the server's message on any failure),
3. decode the response (:func:`decode_rest_response`, :func:`decode_grpc_response`) into a
   :class:`Prediction`.

Host, port, model name, version and signature are parameters.

Example:
    >>> client = RestClient("http://127.0.0.1:8501", model="qn")
    >>> client.transcribe_files(["clip.wav"]).transcripts
    ['hello world']
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qn_keras.audio import pad_batch

DEFAULT_TIMEOUT = 60.0
WAV_SIGNATURE = "transcribe_wav"
WAVEFORM_SIGNATURE = "serving_default"
WAV_INPUT = "wav_bytes"
# WAV encodings the serving graph parses; other files are re-encoded by :func:`wav_bytes`.
WAV_SUBTYPES = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE")
MAX_GRPC_MESSAGE = 256 * 1024 * 1024


class ServingError(RuntimeError):
    """A failed request: ``code`` is the HTTP status or the gRPC status name."""

    def __init__(self, code, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclasses.dataclass
class Prediction:
    """Decoded outputs: transcripts and the log-probabilities they came from."""

    transcripts: list[str]
    logprobs: np.ndarray
    logprob_lengths: np.ndarray

    def valid_logprobs(self, index: int) -> np.ndarray:
        return self.logprobs[index, : int(self.logprob_lengths[index])]


def wav_bytes(path) -> bytes:
    """A file's bytes if the serving graph can parse it (a PCM or float WAV), otherwise the
    audio re-encoded as a 32-bit float WAV at its own sample rate (the server resamples)."""
    import soundfile as sf

    path = Path(path)
    data = path.read_bytes()
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            if sf.info(io.BytesIO(data)).subtype in WAV_SUBTYPES:
                return data
        except (sf.LibsndfileError, RuntimeError):
            return data  # let the server name the problem
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(f"Cannot read audio {path}: {e}") from e
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, subtype="FLOAT", format="WAV")
    return buffer.getvalue()


def wav_inputs(files: Sequence[bytes]) -> dict:
    return {WAV_INPUT: list(files)}


def waveform_inputs(waveforms: Sequence[np.ndarray]) -> dict:
    batch, lengths = pad_batch(waveforms)
    return {"waveform": batch, "lengths": lengths}


# REST ---------------------------------------------------------------------------------------


def rest_predict_url(base_url: str, model: str, version: int | None = None) -> str:
    version_part = f"/versions/{int(version)}" if version is not None else ""
    return f"{base_url.rstrip('/')}/v1/models/{model}{version_part}:predict"


def _json_value(value):
    if isinstance(value, bytes | bytearray):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def build_rest_request(signature_name: str, inputs: dict, row_format: bool = False) -> dict:
    """TF Serving's predict JSON: columnar ``{"inputs": {...}}`` by default, or row
    ``{"instances": [...]}``. Bytes become ``{"b64": ...}`` as the REST API requires."""
    if not row_format:
        return {
            "signature_name": signature_name,
            "inputs": {name: _json_value(value) for name, value in inputs.items()},
        }
    names = list(inputs)
    sizes = {len(inputs[name]) for name in names}
    if len(sizes) != 1:
        raise ValueError(f"All inputs need the same batch size for row format. Received: {sizes}")
    instances = [{name: _json_value(inputs[name][i]) for name in names} for i in range(sizes.pop())]
    return {"signature_name": signature_name, "instances": instances}


def _from_b64(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"]).decode("utf-8")
    return value


def decode_rest_response(body: dict) -> Prediction:
    """A :class:`Prediction` from a predict response in row or columnar form."""
    if "error" in body:
        raise ServingError("error", body["error"])
    if "outputs" in body:
        outputs = body["outputs"]
        transcripts = [_from_b64(t) for t in outputs["transcripts"]]
        logprobs = np.asarray(outputs["logprobs"], dtype=np.float32)
        lengths = np.asarray(outputs["logprob_lengths"], dtype=np.int32)
    elif "predictions" in body:
        rows = body["predictions"]
        transcripts = [_from_b64(r["transcripts"]) for r in rows]
        logprobs = np.asarray([r["logprobs"] for r in rows], dtype=np.float32)
        lengths = np.asarray([r["logprob_lengths"] for r in rows], dtype=np.int32)
    else:
        raise ServingError("bad_response", f"No 'outputs' or 'predictions' in {list(body)}")
    return Prediction(transcripts, logprobs, lengths)


def rest_outputs(body: dict) -> dict:
    """Every output of a columnar predict response, as numpy arrays (strings as str)."""
    if "error" in body:
        raise ServingError("error", body["error"])
    if "outputs" not in body:
        raise ServingError("bad_response", f"No 'outputs' in {list(body)}")
    out = {}
    for name, value in body["outputs"].items():
        if isinstance(value, list) and value and isinstance(value[0], str | dict):
            out[name] = np.asarray([_from_b64(v) for v in value], dtype=object)
        else:
            out[name] = np.asarray(value)
    return out


class RestClient:
    """TF Serving REST predict client.

    Args:
        url: server root, e.g. ``http://127.0.0.1:8501``.
        model: model name; version: a version number, or None for the latest.
        timeout: seconds per request.
    """

    def __init__(
        self,
        url: str,
        model: str,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        row_format: bool = False,
    ):
        import requests

        self.url = url.rstrip("/")
        self.model = model
        self.version = version
        self.timeout = timeout
        self.row_format = row_format
        self.session = requests.Session()

    def predict(self, request: dict) -> dict:
        """POSTs a predict request; ServingError with the server's message on failure."""
        import requests

        try:
            response = self.session.post(
                rest_predict_url(self.url, self.model, self.version),
                json=request,
                timeout=self.timeout,
            )
        except requests.RequestException as e:
            raise ServingError("unavailable", f"{self.url}: {e}") from e
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:500]}
        if response.status_code != 200 or "error" in body:
            raise ServingError(response.status_code, body.get("error", response.reason))
        return body

    def status(self) -> dict:
        import requests

        url = f"{self.url}/v1/models/{self.model}"
        if self.version is not None:
            url += f"/versions/{self.version}"
        try:
            response = self.session.get(url, timeout=self.timeout)
        except requests.RequestException as e:
            raise ServingError("unavailable", f"{self.url}: {e}") from e
        if response.status_code != 200:
            raise ServingError(response.status_code, response.text[:500])
        return response.json()

    def transcribe_wav(self, files: Sequence[bytes]) -> Prediction:
        request = build_rest_request(WAV_SIGNATURE, wav_inputs(files), self.row_format)
        return decode_rest_response(self.predict(request))

    def predict_outputs(self, signature_name: str, inputs: dict) -> dict:
        """Any signature (columnar request); its outputs as numpy arrays."""
        return rest_outputs(self.predict(build_rest_request(signature_name, inputs)))

    def transcribe_waveforms(self, waveforms: Sequence[np.ndarray]) -> Prediction:
        request = build_rest_request(
            WAVEFORM_SIGNATURE, waveform_inputs(waveforms), self.row_format
        )
        return decode_rest_response(self.predict(request))

    def transcribe_files(self, paths: Sequence) -> Prediction:
        return self.transcribe_wav([wav_bytes(p) for p in paths])

    def close(self) -> None:
        self.session.close()


# gRPC ---------------------------------------------------------------------------------------


def build_grpc_request(model: str, signature_name: str, inputs: dict, version: int | None = None):
    """A ``tensorflow_serving.apis.predict_pb2.PredictRequest``."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        if isinstance(value, list) and value and isinstance(value[0], bytes | bytearray):
            proto = tf.make_tensor_proto(value, dtype=tf.string)
        else:
            proto = tf.make_tensor_proto(np.asarray(value))
        request.inputs[name].CopyFrom(proto)
    return request


def decode_grpc_response(response) -> Prediction:
    import tensorflow as tf

    outputs = response.outputs
    return Prediction(
        transcripts=[t.decode("utf-8") for t in tf.make_ndarray(outputs["transcripts"]).tolist()],
        logprobs=tf.make_ndarray(outputs["logprobs"]).astype(np.float32),
        logprob_lengths=tf.make_ndarray(outputs["logprob_lengths"]).astype(np.int32),
    )


class GrpcClient:
    """TF Serving gRPC ``PredictionService`` client.

    Args:
        target: ``host:port`` of the gRPC endpoint, e.g. ``127.0.0.1:8500``.
        model: model name; version: a version number, or None for the latest.
        timeout: seconds per request.
    """

    def __init__(
        self,
        target: str,
        model: str,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.target = target
        self.model = model
        self.version = version
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        ]
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def predict(self, request):
        """Sends a PredictRequest; ServingError with the status name and details on failure."""
        import grpc

        try:
            return self.stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServingError(e.code().name, e.details()) from e

    def transcribe_wav(self, files: Sequence[bytes]) -> Prediction:
        request = build_grpc_request(self.model, WAV_SIGNATURE, wav_inputs(files), self.version)
        return decode_grpc_response(self.predict(request))

    def predict_outputs(self, signature_name: str, inputs: dict) -> dict:
        """Any signature; its outputs as numpy arrays."""
        import tensorflow as tf

        request = build_grpc_request(self.model, signature_name, inputs, self.version)
        response = self.predict(request)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def transcribe_waveforms(self, waveforms: Sequence[np.ndarray]) -> Prediction:
        request = build_grpc_request(
            self.model, WAVEFORM_SIGNATURE, waveform_inputs(waveforms), self.version
        )
        return decode_grpc_response(self.predict(request))

    def transcribe_files(self, paths: Sequence) -> Prediction:
        return self.transcribe_wav([wav_bytes(p) for p in paths])

    def close(self) -> None:
        self.channel.close()


class RemoteStreamStep:
    """A server's ``stream_step`` as a stream step for
    :class:`~qn_keras.streaming.recognizer.StatefulEngine`: the client keeps the state and
    sends it with every chunk, so the server holds nothing between calls."""

    def __init__(self, client):
        self.client = client

    def __call__(self, audio, state, counters, end) -> dict:
        inputs = {
            "audio": np.asarray(audio, np.float32),
            "state": np.asarray(state, np.float32),
            "counters": np.asarray(counters, np.int32),
            "end": np.asarray(end, np.int32),
            "text": [b""] * len(audio),
        }
        return self.client.predict_outputs("stream_step", inputs)
