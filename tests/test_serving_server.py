"""`qn serve` end to end: both clients against the local server, parity with the SavedModel and
the Keras model, TF Serving's status/metadata endpoints, and bad requests that get a 4xx or
INVALID_ARGUMENT while the server keeps serving."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import serving_utils as su

from serving import client as qc
from serving.server import LocalModelServer, Servable, ServerConfig

LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def server():
    version_dir = su.export_dir()
    servable = Servable(su.MODEL_NAME, version_dir, loaded=su.loaded_export())
    config = ServerConfig(rest_port=0, grpc_port=0, max_request_bytes=LIMIT)
    with LocalModelServer(version_dir.parent, config, servable=servable) as running:
        yield running


@pytest.fixture(scope="module")
def rest(server):
    c = qc.RestClient(f"http://127.0.0.1:{server.rest_port}", su.MODEL_NAME, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    c = qc.GrpcClient(f"127.0.0.1:{server.grpc_port}", su.MODEL_NAME, timeout=60)
    yield c
    c.close()


def _paths(count=6):
    return [item["audio_filepath"] for item in su.sample_items(count)]


def _keras(waveforms):
    batch, lengths = su.pad(waveforms)
    logprobs, out_lengths = su.keras_reference()(batch, lengths)
    return logprobs, out_lengths, su.greedy_texts(logprobs, out_lengths)


def _assert_matches(prediction, logprobs, lengths, texts):
    np.testing.assert_array_equal(prediction.logprob_lengths, lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(prediction.valid_logprobs(b), logprobs[b, :n], atol=1e-4)
    assert prediction.transcripts == texts


@pytest.mark.parametrize("row_format", [False, True])
def test_rest_files_match_keras(rest, row_format):
    """FLAC files go out re-encoded as WAV at their own rate; the server decodes in-graph."""
    rest.row_format = row_format
    reference = _keras(su.sample_waveforms()[:6])
    _assert_matches(rest.transcribe_files(_paths()), *reference)
    rest.row_format = False


def test_grpc_files_match_keras(grpc_client):
    reference = _keras(su.sample_waveforms()[:6])
    _assert_matches(grpc_client.transcribe_files(_paths()), *reference)


def test_waveform_signature_through_both_clients(rest, grpc_client):
    waveforms = su.sample_waveforms()[:4]
    reference = _keras(waveforms)
    _assert_matches(rest.transcribe_waveforms(waveforms), *reference)
    _assert_matches(grpc_client.transcribe_waveforms(waveforms), *reference)


def test_status_and_metadata(server, rest, grpc_client):
    assert rest.status() == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    base = f"http://127.0.0.1:{server.rest_port}/v1/models/{su.MODEL_NAME}"
    meta = requests.get(f"{base}/metadata", timeout=30).json()
    signatures = meta["metadata"]["signature_def"]["signatureDef"]
    assert set(signatures) >= {"serving_default", "transcribe_wav"}
    assert set(signatures["transcribe_wav"]["inputs"]) == {"wav_bytes"}
    assert requests.get(f"{base}/versions/7", timeout=30).status_code == 404

    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    stub = model_service_pb2_grpc.ModelServiceStub(grpc_client.channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = su.MODEL_NAME
    status = stub.GetModelStatus(request, timeout=30)
    assert [s.version for s in status.model_version_status] == [1]


def _post(server, body, path=None, raw=None):
    url = f"http://127.0.0.1:{server.rest_port}" + (path or f"/v1/models/{su.MODEL_NAME}:predict")
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(url, data=data, timeout=60)


def _good_wav():
    return qc.wav_bytes(_paths(1)[0])


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("malformed_json", 400, "Malformed JSON"),
        ("wrong_signature", 400, 'Serving signature name: "nope" not found'),
        ("undecodable_audio", 400, "wav_bytes[1]: audio is not a WAV file"),
        ("missing_input", 400, "missing ['lengths']"),
        ("ragged_waveform", 400, "Input 'waveform' is not a valid float32"),
        ("both_formats", 400, "exactly one of 'instances' or 'inputs'"),
        ("unknown_model", 404, "Servable not found"),
        ("wrong_version", 404, "Specific(qn, 9)"),
        ("too_large", 413, "over the server's limit"),
    ],
)
def test_rest_bad_requests_then_keeps_serving(server, rest, case, status, message):
    good = {"b64": base64.b64encode(_good_wav()).decode()}
    bad = {"b64": base64.b64encode(b"RIFF....nonsense").decode()}
    kwargs = {
        "malformed_json": {"body": None, "raw": b'{"inputs": [1, 2'},
        "wrong_signature": {"body": {"signature_name": "nope", "inputs": [good]}},
        "undecodable_audio": {"body": {"signature_name": "transcribe_wav", "inputs": [good, bad]}},
        "missing_input": {"body": {"inputs": {"waveform": [[0.0] * 4000]}}},
        "ragged_waveform": {
            "body": {"inputs": {"waveform": [[0.0] * 4000, [0.0] * 10], "lengths": [4000, 10]}}
        },
        "both_formats": {"body": {"inputs": [good], "instances": [good]}},
        "unknown_model": {"body": {"inputs": [good]}, "path": "/v1/models/other:predict"},
        "wrong_version": {
            "body": {"inputs": [good]},
            "path": f"/v1/models/{su.MODEL_NAME}/versions/9:predict",
        },
        "too_large": {"body": None, "raw": b"x" * (LIMIT + 1)},
    }[case]
    response = _post(server, **kwargs)
    assert response.status_code == status
    assert message in response.json()["error"]
    # The server is still healthy.
    assert len(rest.transcribe_files(_paths(2)).transcripts) == 2


@pytest.mark.parametrize("case", ["undecodable_audio", "wrong_signature", "too_large", "model"])
def test_grpc_bad_requests_then_keeps_serving(grpc_client, case):
    if case == "undecodable_audio":
        request = qc.build_grpc_request(
            su.MODEL_NAME, "transcribe_wav", qc.wav_inputs([_good_wav(), b"garbage"])
        )
        code, message = "INVALID_ARGUMENT", "wav_bytes[1]: audio is not a WAV file"
    elif case == "wrong_signature":
        request = qc.build_grpc_request(su.MODEL_NAME, "nope", qc.wav_inputs([_good_wav()]))
        code, message = "INVALID_ARGUMENT", "not found in signature def"
    elif case == "too_large":
        request = qc.build_grpc_request(
            su.MODEL_NAME, "transcribe_wav", qc.wav_inputs([b"x" * (LIMIT + 10)])
        )
        code, message = "INVALID_ARGUMENT", "over the server's limit"
    else:
        request = qc.build_grpc_request("other", "transcribe_wav", qc.wav_inputs([_good_wav()]))
        code, message = "NOT_FOUND", "Servable not found"
    with pytest.raises(qc.ServingError) as error:
        grpc_client.predict(request)
    assert error.value.code == code
    assert message in error.value.message
    assert len(grpc_client.transcribe_files(_paths(2)).transcripts) == 2


def test_concurrent_clients_all_succeed(rest, grpc_client):
    paths = _paths(3)
    expected = _keras(su.sample_waveforms()[:3])[2]

    def call(i):
        return (rest if i % 2 else grpc_client).transcribe_files(paths).transcripts

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(16)))
    assert results == [expected] * 16


@pytest.mark.parametrize("use_grpc", [False, True])
def test_qn_client_cli(server, use_grpc):
    from qn_cli.main import main

    paths = _paths(3)
    argv = ["client", "--model", su.MODEL_NAME, "--batch-size", "2", *paths]
    if use_grpc:
        argv += ["--grpc", f"127.0.0.1:{server.grpc_port}"]
    else:
        argv += ["--url", f"http://127.0.0.1:{server.rest_port}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    lines = [line.split("\t") for line in out.getvalue().splitlines()]
    assert [p for p, _ in lines] == paths
    assert [t for _, t in lines] == _keras(su.sample_waveforms()[:3])[2]
