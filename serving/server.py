"""A small local model server speaking TF Serving's REST and gRPC predict protocols.

TF Serving's ``tensorflow_model_server`` is not on PyPI or Debian and needs Docker, so
``qn serve`` stands in for it during development and in tests: it serves the latest version
under ``BASE/NAME`` with the same endpoints the clients (and TF Serving users) call:

- REST: ``POST /v1/models/NAME[/versions/N]:predict`` with ``{"signature_name": ...,
  "instances": [...]}`` (row) or ``{"inputs": ...}`` (columnar), binary values as
  ``{"b64": ...}``; ``GET /v1/models/NAME[/versions/N]`` (status) and ``.../metadata``.
- gRPC: ``tensorflow.serving.PredictionService/Predict`` and ``GetModelMetadata``, and
  ``tensorflow.serving.ModelService/GetModelStatus``.

A malformed request, an unknown signature or input, audio the graph cannot decode, or a
request over ``max_request_bytes`` gets HTTP 4xx / ``INVALID_ARGUMENT`` with a message, and the
server keeps serving. Requests run on a thread pool; each request may carry a batch. It binds
to 127.0.0.1 unless told otherwise: there is no authentication.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
from concurrent import futures
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import tensorflow as tf

from qn_keras.inference import refusal_message
from serving.export import read_warmup_file
from serving.layout import WARMUP_FILE, existing_versions, latest_version_dir

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


class InvalidRequest(ValueError):
    """The request is wrong: HTTP 400 / INVALID_ARGUMENT."""


class NotFound(LookupError):
    """Unknown model or version: HTTP 404 / NOT_FOUND."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    rest_port: int | None = 8501
    grpc_port: int | None = 8500
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    threads: int = 8


class Servable:
    """One loaded SavedModel version and its signatures, with request validation."""

    def __init__(self, name: str, version_dir, loaded=None):
        from tensorflow.core.protobuf import saved_model_pb2

        self.name = name
        self.version_dir = Path(version_dir)
        self.version = int(self.version_dir.name)
        self.loaded = loaded if loaded is not None else tf.saved_model.load(str(self.version_dir))
        self.signatures = dict(self.loaded.signatures)
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((self.version_dir / "saved_model.pb").read_bytes())
        self.signature_defs = proto.meta_graphs[0].signature_def
        self.input_specs = {
            key: fn.structured_input_signature[1] for key, fn in self.signatures.items()
        }

    def check_version(self, version) -> None:
        if version is not None and int(version) != self.version:
            raise NotFound(
                f"Servable not found for request: Specific({self.name}, {version}); "
                f"serving version {self.version}"
            )

    def _signature(self, signature_name: str):
        signature_name = signature_name or "serving_default"
        if signature_name not in self.signatures:
            raise InvalidRequest(
                f'Serving signature name: "{signature_name}" not found in signature def; '
                f"available: {', '.join(sorted(self.signatures))}"
            )
        return signature_name, self.signatures[signature_name]

    def _tensor(self, name: str, spec: tf.TensorSpec, value) -> tf.Tensor:
        try:
            if spec.dtype == tf.string:
                array = np.asarray(value, dtype=object)
            else:
                array = np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"Input '{name}' is not a valid {spec.dtype.name}: {e}") from e
        if spec.shape.rank is not None and array.ndim != spec.shape.rank:
            raise InvalidRequest(
                f"Input '{name}' must have rank {spec.shape.rank} (shape {spec.shape}); "
                f"received shape {list(array.shape)}"
            )
        if spec.dtype == tf.string and array.size:
            bad = [v for v in array.ravel() if not isinstance(v, bytes)]
            if bad:
                raise InvalidRequest(f"Input '{name}' must hold bytes/strings.")
        return tf.constant(array, dtype=spec.dtype)

    def predict(self, signature_name: str, inputs: dict) -> tuple[str, dict]:
        """Runs a signature on numpy/list inputs; returns (signature name, numpy outputs)."""
        signature_name, fn = self._signature(signature_name)
        specs = self.input_specs[signature_name]
        missing, extra = sorted(set(specs) - set(inputs)), sorted(set(inputs) - set(specs))
        if missing or extra:
            raise InvalidRequest(
                f"Signature '{signature_name}' takes inputs {sorted(specs)}; "
                f"missing {missing}, unexpected {extra}"
            )
        tensors = {name: self._tensor(name, specs[name], inputs[name]) for name in specs}
        sizes = {int(t.shape[0]) for t in tensors.values() if t.shape.rank}
        if len(sizes) > 1:
            raise InvalidRequest(f"Inputs disagree on the batch size: {sorted(sizes)}")
        if sizes == {0}:
            raise InvalidRequest("Empty batch: send at least one instance.")
        try:
            outputs = fn(**tensors)
        except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
            raise InvalidRequest(refusal_message(e)) from e
        return signature_name, {key: value.numpy() for key, value in outputs.items()}

    def status(self) -> dict:
        return {
            "model_version_status": [
                {
                    "version": str(self.version),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }

    def signature_def_map(self):
        from tensorflow_serving.apis import get_model_metadata_pb2

        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in self.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        return signature_map

    def warmup(self) -> int:
        """Replays assets.extra/tf_serving_warmup_requests as TF Serving does at load time."""
        path = self.version_dir / "assets.extra" / WARMUP_FILE
        if not path.is_file():
            return 0
        requests = read_warmup_file(path)
        for request in requests:
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            self.predict(request.model_spec.signature_name, inputs)
        return len(requests)


# REST ---------------------------------------------------------------------------------------

_PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
_STATUS = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?$")


def _decode_json_value(value):
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError) as e:
                raise InvalidRequest(f"Invalid base64 in a {{'b64': ...}} value: {e}") from e
        raise InvalidRequest(f"Unexpected object {sorted(value)[:5]}: only {{'b64': ...}}")
    if isinstance(value, list):
        return [_decode_json_value(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def parse_json_body(raw: bytes):
    """The request's JSON; InvalidRequest for anything that is not JSON we can read, including
    nesting too deep for the parser (which Python reports as RecursionError)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"Malformed JSON: {e}") from e
    except RecursionError:
        raise InvalidRequest("Malformed JSON: nested too deeply to parse.") from None


def parse_rest_request(body: dict, input_names: list[str]) -> tuple[dict, bool]:
    """``(inputs, row_format)`` from a predict JSON body, for a signature's input names."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidRequest("The request needs exactly one of 'instances' or 'inputs'.")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidRequest("'instances' must be a non-empty list.")
        named = all(isinstance(i, dict) and set(i) != {"b64"} for i in instances)
        if named:
            keys = {tuple(sorted(i)) for i in instances}
            if len(keys) != 1:
                raise InvalidRequest("All instances must have the same input names.")
            inputs = {k: [_decode_json_value(i[k]) for i in instances] for k in keys.pop()}
        elif len(input_names) == 1:
            inputs = {input_names[0]: [_decode_json_value(i) for i in instances]}
        else:
            raise InvalidRequest(
                f"This signature takes {len(input_names)} inputs {input_names}: send each "
                "instance as an object keyed by input name."
            )
        return inputs, True
    columns = body["inputs"]
    if isinstance(columns, dict) and set(columns) != {"b64"}:
        return {k: _decode_json_value(v) for k, v in columns.items()}, False
    if len(input_names) == 1:
        return {input_names[0]: _decode_json_value(columns)}, False
    raise InvalidRequest(f"'inputs' must be an object keyed by the input names {input_names}.")


def _json_output(name: str, array: np.ndarray):
    if array.dtype == object:
        # TF Serving base64-encodes string outputs whose name ends in "_bytes" only.
        if name.endswith("_bytes"):
            return _json_tree(array, lambda b: {"b64": base64.b64encode(b).decode("ascii")})
        return _json_tree(array, lambda b: b.decode("utf-8", errors="replace"))
    return array.tolist()


def _json_tree(value, convert):
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return convert(value.item())
        return [_json_tree(v, convert) for v in value]
    return convert(value)


def format_rest_response(outputs: dict, row_format: bool) -> dict:
    if not row_format:
        return {"outputs": {k: _json_output(k, v) for k, v in outputs.items()}}
    batch = len(next(iter(outputs.values())))
    return {
        "predictions": [
            {k: _json_output(k, np.asarray(v[i], dtype=v.dtype)) for k, v in outputs.items()}
            for i in range(batch)
        ]
    }


class _RestHandler(BaseHTTPRequestHandler):
    server_version = "qn-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002  (quiet: no line per request)
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def do_GET(self):  # noqa: N802
        servable: Servable = self.server.servable
        match = _STATUS.match(self.path)
        if not match or match.group(1) != servable.name:
            self._error(404, f"Servable not found: {self.path}")
            return
        try:
            servable.check_version(match.group(2))
        except NotFound as e:
            self._error(404, str(e))
            return
        if match.group(3):
            from google.protobuf import json_format

            metadata = json_format.MessageToDict(servable.signature_def_map())
            body = {
                "model_spec": {"name": servable.name, "version": str(servable.version)},
                "metadata": {"signature_def": metadata},
            }
            self._send(200, body)
        else:
            self._send(200, servable.status())

    def do_POST(self):  # noqa: N802
        servable: Servable = self.server.servable
        limit = self.server.max_request_bytes
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required.")
            return
        if int(length) > limit:
            # Drain a moderately large body so the client reads the answer instead of a reset;
            # drop the connection without reading a huge one.
            self.close_connection = True
            if int(length) <= 8 * limit:
                remaining = int(length)
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"Request of {int(length)} bytes is over the server's limit of {limit} bytes.",
            )
            return
        raw = self.rfile.read(int(length))
        match = _PREDICT.match(self.path)
        if not match or match.group(1) != servable.name:
            self._error(404, f"Servable not found for request: {self.path}")
            return
        try:
            servable.check_version(match.group(2))
            body = parse_json_body(raw)
            signature = (body.get("signature_name") if isinstance(body, dict) else None) or (
                "serving_default"
            )
            signature, _ = servable._signature(signature)
            inputs, rows = parse_rest_request(body, sorted(servable.input_specs[signature]))
            _, outputs = servable.predict(signature, inputs)
        except NotFound as e:
            self._error(404, str(e))
            return
        except InvalidRequest as e:
            self._error(400, str(e))
            return
        except RecursionError:  # JSON that parses but nests too deeply for the inputs
            self._error(400, "Malformed request: values nested too deeply.")
            return
        except Exception as e:  # noqa: BLE001  (keep serving; report it)
            self._error(500, f"Internal error: {type(e).__name__}: {e}")
            return
        self._send(200, format_rest_response(outputs, rows))


class _RestServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, servable: Servable, max_request_bytes: int):
        super().__init__(address, _RestHandler)
        self.servable = servable
        self.max_request_bytes = max_request_bytes


# gRPC ---------------------------------------------------------------------------------------


def _grpc_services(servable: Servable, max_request_bytes: int):
    import grpc
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    def check_spec(spec, context):
        if spec.name != servable.name:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({spec.name})",
            )
        if spec.HasField("version"):
            try:
                servable.check_version(spec.version.value)
            except NotFound as e:
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802
            if request.ByteSize() > max_request_bytes:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Request of {request.ByteSize()} bytes is over the server's limit of "
                    f"{max_request_bytes} bytes.",
                )
            check_spec(request.model_spec, context)
            try:
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            except (TypeError, ValueError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed tensor: {e}")
            try:
                signature, outputs = servable.predict(request.model_spec.signature_name, inputs)
            except InvalidRequest as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = signature
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
            return response

        def GetModelMetadata(self, request, context):  # noqa: N802
            check_spec(request.model_spec, context)
            if list(request.metadata_field) != ["signature_def"]:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Only metadata_field 'signature_def' is supported.",
                )
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(servable.signature_def_map())
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):  # noqa: N802
            check_spec(request.model_spec, context)
            response = get_model_status_pb2.GetModelStatusResponse()
            status = response.model_version_status.add()
            status.version = servable.version
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            return response

    def add(server):
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(), server)

    return add


class LocalModelServer:
    """Serves the latest version under ``model_base`` (``BASE/NAME``) over REST and gRPC.

    Port 0 picks a free port (see :attr:`rest_port`, :attr:`grpc_port` after :meth:`start`);
    None disables that protocol.

    Example:
        >>> with LocalModelServer("exports/qn", ServerConfig(rest_port=0, grpc_port=0)) as s:
        ...     RestClient(f"http://127.0.0.1:{s.rest_port}", "qn").transcribe_files(["a.wav"])
    """

    def __init__(self, model_base, config: ServerConfig | None = None, servable=None):
        self.config = config or ServerConfig()
        model_base = Path(model_base)
        if (model_base / "saved_model.pb").is_file():
            version_dir = model_base
            model_base = model_base.parent
        elif existing_versions(model_base):
            version_dir = latest_version_dir(model_base)
        else:
            raise ValueError(
                f"{model_base} holds no version folders; pass BASE/NAME as written by "
                "`qn export --out BASE --name NAME`."
            )
        self.servable = servable or Servable(model_base.name, version_dir)
        self.rest_port = None
        self.grpc_port = None
        self._http = None
        self._grpc = None
        self._thread = None

    def start(self) -> LocalModelServer:
        import grpc

        cfg = self.config
        self.servable.warmup()
        if cfg.rest_port is not None:
            self._http = _RestServer(
                (cfg.host, cfg.rest_port), self.servable, cfg.max_request_bytes
            )
            self.rest_port = self._http.server_address[1]
            self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
            self._thread.start()
        if cfg.grpc_port is not None:
            # Twice the limit, so that requests just over it reach Predict and get
            # INVALID_ARGUMENT with a message; far larger ones get gRPC's RESOURCE_EXHAUSTED.
            options = [
                ("grpc.max_receive_message_length", 2 * cfg.max_request_bytes),
                ("grpc.max_send_message_length", -1),
            ]
            self._grpc = grpc.server(
                futures.ThreadPoolExecutor(max_workers=cfg.threads), options=options
            )
            _grpc_services(self.servable, cfg.max_request_bytes)(self._grpc)
            port = self._grpc.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
            if port == 0:
                self.stop()
                raise OSError(f"Cannot bind gRPC to {cfg.host}:{cfg.grpc_port}")
            self.grpc_port = port
            self._grpc.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace=1.0).wait()
            self._grpc = None

    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
