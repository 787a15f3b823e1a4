"""`qn serve` end to end: both clients against the local server, parity with the SavedModel and
the Keras model, TF Serving's status/metadata endpoints, and bad requests that get a 4xx or
INVALID_ARGUMENT while the server keeps serving."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import serving_utils as su
from parity import assert_logprobs_close

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
        assert_logprobs_close(prediction.valid_logprobs(b), logprobs[b, :n])
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


def test_qn_client_decodes_with_an_lm(server, rest, tmp_path):
    """TF Serving returns log-probs; `qn client --lm` decodes them here, as LMDecoder does."""
    from qn_cli.main import main
    from qn_keras.lm.build import build_lm
    from qn_keras.lm.decoder import LMDecoder
    from qn_keras.tokenizer import ENGLISH_LABELS

    lm = tmp_path / "lm"
    build_lm([su.REPO / "sample_data" / "train.json"], lm, order=2)
    paths = _paths(3)
    argv = ["client", "--model", su.MODEL_NAME, "--url", f"http://127.0.0.1:{server.rest_port}",
            "--lm", str(lm), "--beam", "8", *paths]  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    prediction = rest.transcribe_files(paths)
    decoder = LMDecoder.from_folder(ENGLISH_LABELS, lm, beam_width=8)
    expected = decoder.decode_texts(prediction.logprobs, prediction.logprob_lengths)
    assert [line.split("\t")[1] for line in out.getvalue().splitlines()] == expected


# Requests the graph must refuse (checked in the SavedModel, so TF Serving refuses them too) --

_TONE = (0.1 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
BAD_WAVEFORMS = {
    # name: (waveform rows, lengths, expected message)
    "nan_samples": (
        [_TONE, np.full(16000, np.nan, np.float32)],
        [16000, 16000],
        "waveform item(s) 1: non-finite samples",
    ),
    "negative_length": ([_TONE, _TONE], [16000, -5], "lengths of item(s) 1: negative length"),
    "length_past_samples": (
        [_TONE, _TONE],
        [16000, 1000000000],
        "lengths of item(s) 1: length exceeds the 16000 samples given",
    ),
    "zero_length": ([_TONE, _TONE], [16000, 0], "audio of item(s) 1: shorter than"),
    "empty_waveform": ([np.zeros(0, np.float32)], [0], "audio of item(s) 0: shorter than"),
    "lengths_batch": ([_TONE], [16000, 16000], "one length per waveform row"),
}


def _bad_inputs(case):
    rows, lengths, message = BAD_WAVEFORMS[case]
    waveform = np.stack(rows) if len(rows[0]) else np.zeros((1, 0), np.float32)
    return {"waveform": waveform, "lengths": np.asarray(lengths, np.int32)}, message


@pytest.mark.parametrize("case", sorted(BAD_WAVEFORMS))
def test_rest_refuses_bad_waveforms(server, rest, case):
    inputs, message = _bad_inputs(case)
    body = qc.build_rest_request("serving_default", inputs)
    if case == "lengths_batch":  # our server's own batch check answers first; TF Serving's graph
        message = "disagree on the batch size"
    response = _post(server, body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert len(rest.transcribe_files(_paths(1)).transcripts) == 1


@pytest.mark.parametrize("case", sorted(BAD_WAVEFORMS))
def test_grpc_refuses_bad_waveforms(grpc_client, case):
    inputs, message = _bad_inputs(case)
    if case == "lengths_batch":
        message = "disagree on the batch size"
    request = qc.build_grpc_request(su.MODEL_NAME, "serving_default", inputs)
    with pytest.raises(qc.ServingError) as error:
        grpc_client.predict(request)
    assert error.value.code == "INVALID_ARGUMENT"
    assert message in error.value.message
    assert len(grpc_client.transcribe_files(_paths(1)).transcripts) == 1


@pytest.mark.parametrize("case", sorted(BAD_WAVEFORMS))
def test_saved_model_itself_refuses_bad_waveforms(case):
    """What TF Serving runs: the signature alone, without our server's own request checks."""
    import tensorflow as tf

    inputs, message = _bad_inputs(case)
    signature = su.loaded_export().signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
        signature(waveform=tf.constant(inputs["waveform"]), lengths=tf.constant(inputs["lengths"]))


def test_rest_refuses_json_nested_too_deeply(server, rest):
    response = _post(server, None, raw=b"[" * 100_000 + b"]" * 100_000)
    assert response.status_code == 400
    assert "Malformed JSON" in response.json()["error"]
    assert len(rest.transcribe_files(_paths(1)).transcripts) == 1


def test_grpc_refuses_malformed_tensor(grpc_client):
    """gRPC carries no JSON; its malformed counterpart is a TensorProto whose content does not
    match its shape."""
    inputs, _ = _bad_inputs("nan_samples")
    request = qc.build_grpc_request(su.MODEL_NAME, "serving_default", inputs)
    request.inputs["waveform"].tensor_shape.dim[1].size = 7  # claims 7 samples, holds 16000
    with pytest.raises(qc.ServingError) as error:
        grpc_client.predict(request)
    assert error.value.code == "INVALID_ARGUMENT"
    assert len(grpc_client.transcribe_files(_paths(1)).transcripts) == 1
