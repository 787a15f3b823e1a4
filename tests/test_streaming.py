"""Streaming (issue 15): the limited-look-ahead model against the numpy reference, the stateful
stream step equal to offline inference however the audio is chunked (Python, the exported
SavedModel's `stream_step`, the streaming TFLite model, `qn serve` through `qn client`),
buffered streaming of any model, and the bad inputs each path refuses."""

from __future__ import annotations

import functools
import io
import json
import struct
import sys
import threading

import numpy as np
import pytest
import reference_numpy as ref
import serving_utils as su
import tensorflow as tf
from cli_utils import run_qn

from qn_keras.errors import UserInputError
from qn_keras.featurizer import FeaturizerConfig
from qn_keras.model_dir import ModelBundle, save_model_dir
from qn_keras.quartznet_backbone import lookahead_padding, normalize_block_lists
from qn_keras.quartznet_ctc import QuartzNetCTC
from qn_keras.streaming.normalization import DEFAULT_PRIOR_FRAMES, METADATA_KEY, FeaturePrior
from qn_keras.streaming.recognizer import StatefulEngine, StreamingRecognizer, StreamSettings

LOOKAHEAD = 7
# TINY_BLOCKS' convolutions with room for look-ahead, one frame each for a budget of 7 feature
# frames: C1 at the feature rate costs 1, the three after its stride 2 cost 2 each.
EXPECTED_RIGHT = {(0, 0): 1, (1, 0): 1, (1, 1): 1, (2, 0): 1}


def test_lookahead_padding_deals_the_budget():
    blocks = normalize_block_lists(**su.TINY_BLOCKS)
    assert lookahead_padding(blocks, 1.0, None) == {}
    assert lookahead_padding(blocks, 1.0, 0) == {(0, 0): 0, (1, 0): 0, (1, 1): 0, (2, 0): 0}
    assert lookahead_padding(blocks, 1.0, LOOKAHEAD) == EXPECTED_RIGHT
    # 9: the 2 frames left after the first round go to C1 (the others would cost 2 of 1).
    assert lookahead_padding(blocks, 1.0, 9) == {**EXPECTED_RIGHT, (0, 0): 3}
    # Never more future than symmetric padding has: C1's kernel 11 pads 5 per side.
    assert lookahead_padding(blocks, 1.0, 1000)[(0, 0)] == 5
    with pytest.raises(ValueError, match="lookahead"):
        lookahead_padding(blocks, 1.0, -1)
    se = normalize_block_lists(**su.TINY_BLOCKS, stackwise_se=[False, True, False, False])
    with pytest.raises(ValueError, match="squeeze-and-excitation"):
        lookahead_padding(se, 1.0, 4)


@functools.cache
def prior() -> FeaturePrior:
    from qn_keras.featurizer import LogMelSpectrogram
    from qn_keras.streaming.prior import prior_from_audio

    return prior_from_audio(su.sample_paths(12), LogMelSpectrogram(), limit=12)


@functools.cache
def lookahead_bundle() -> ModelBundle:
    tf.keras.utils.set_random_seed(11)
    model = QuartzNetCTC(vocabulary_size=29, name="tiny_la", lookahead=LOOKAHEAD, **su.TINY_BLOCKS)
    kernel, bias = model.get_layer("ctc_head_conv").get_weights()
    model.get_layer("ctc_head_conv").set_weights([kernel * 2.0, bias])
    su.randomize_batch_norm(model, 11)
    from qn_keras.tokenizer import CharTokenizer

    return ModelBundle(
        model, CharTokenizer(), FeaturizerConfig(), metadata={METADATA_KEY: prior().to_dict()}
    )


def _weights(model) -> dict:
    return {layer.name: layer.get_weights() for layer in model.layers if layer.get_weights()}


def test_lookahead_model_matches_the_numpy_reference():
    model = lookahead_bundle().model
    features = np.random.default_rng(0).normal(size=(157, 64)).astype(np.float32)
    got, length = model([features[None], tf.constant([157])], training=False)
    expected, expected_length = ref.quartznet_forward(
        features, model.get_config(), _weights(model), right_padding=EXPECTED_RIGHT
    )
    assert int(length[0]) == expected_length == 79
    np.testing.assert_allclose(got[0].numpy(), expected, atol=2e-4)


def test_a_causal_model_does_not_see_the_future():
    tf.keras.utils.set_random_seed(3)
    model = QuartzNetCTC(vocabulary_size=29, lookahead=0, **su.TINY_BLOCKS)
    x = np.random.default_rng(1).normal(size=(1, 120, 64)).astype(np.float32)
    changed = x.copy()
    changed[:, 60:] = np.random.default_rng(2).normal(size=(1, 60, 64))
    a, _ = model([x, tf.constant([120])], training=False)
    b, _ = model([changed, tf.constant([120])], training=False)
    # Output frame o of the stride-2 model sees feature frames up to 2o: frames < 30 are equal.
    np.testing.assert_array_equal(a[0, :30].numpy(), b[0, :30].numpy())
    assert not np.allclose(a[0, 30].numpy(), b[0, 30].numpy())


# Streaming = offline -------------------------------------------------------------------------


def _stream_audio() -> np.ndarray:
    """Three sample clips back to back (about 4 s), an odd number of samples."""
    return np.concatenate(su.sample_waveforms(3)[:3] + (np.zeros(77, np.float32),))


def _adaptive_reference(log_mel: np.ndarray, prior_frames: float | None) -> np.ndarray:
    """Frame-causal normalization written out directly: frame t uses the prior, counted as
    N0 frames, pooled with frames 0..t (``fixed``: the prior alone)."""
    mu0 = np.asarray(prior().mean)
    var0 = np.asarray(prior().std) ** 2
    x = log_mel.astype(np.float64)
    if prior_frames is None:
        return ((x - mu0) / (np.sqrt(var0) + 1e-5)).astype(np.float32)
    out = np.empty_like(x)
    for t in range(len(x)):
        n = prior_frames + t + 1
        mean = (prior_frames * mu0 + x[: t + 1].sum(axis=0)) / n
        second = (prior_frames * (var0 + mu0**2) + (x[: t + 1] ** 2).sum(axis=0)) / n
        out[t] = (x[t] - mean) / (np.sqrt(second - mean**2) + 1e-5)
    return out.astype(np.float32)


def _offline(bundle, audio, prior_frames=DEFAULT_PRIOR_FRAMES) -> np.ndarray:
    """The model run offline on the whole stream, features normalized as the stream does."""
    layer = bundle.featurizer_layer()
    log_mel, length = layer.log_mel(audio[None], [len(audio)])
    features = _adaptive_reference(log_mel[0, : int(length[0])].numpy(), prior_frames)
    logprobs, out_length = bundle.model(
        [features[None], tf.constant([len(features)])], training=False
    )
    return logprobs[0, : int(out_length[0])].numpy()


def _feed(stream, audio, sizes) -> tuple[str, list]:
    updates, start, k = [], 0, 0
    while start < len(audio):
        size = sizes[k % len(sizes)]
        updates.append(stream.feed(audio[start : start + size]))
        start, k = start + size, k + 1
    return stream.finish(), updates


@pytest.mark.parametrize(
    "sizes, chunk",
    [([1600], 1.0), ([1, 319, 5000, 333, 16000], 0.5), ([48000], 0.02), ([777, 3], 2.0)],
)
@pytest.mark.parametrize("normalization", ["adaptive", "fixed"])
def test_stateful_stream_equals_offline(sizes, chunk, normalization):
    bundle = lookahead_bundle()
    audio = _stream_audio()
    settings = StreamSettings(
        mode="stateful", chunk_seconds=chunk, normalization=normalization, keep_logprobs=True
    )
    stream = StreamingRecognizer.from_bundle(bundle, settings)
    assert stream.mode == "stateful"
    text, _ = _feed(stream, audio, sizes)
    expected = _offline(bundle, audio, None if normalization == "fixed" else DEFAULT_PRIOR_FRAMES)
    assert stream.logprobs.shape == expected.shape
    np.testing.assert_allclose(stream.logprobs, expected, atol=1e-5, rtol=0)
    assert text == su.greedy_texts(expected[None], np.array([len(expected)]))[0].strip()


def test_stream_front_end_matches_the_numpy_featurizer():
    """The streamed model against the float64 reference chain end to end: NeMo's log-mel,
    the frame-causal normalization and the asymmetric-padding encoder."""
    bundle = lookahead_bundle()
    audio = _stream_audio()
    stream = StreamingRecognizer.from_bundle(bundle, StreamSettings(keep_logprobs=True))
    _feed(stream, audio, [2400])
    log_mel, length = ref.nemo_log_mel(audio[None], [len(audio)])
    features = _adaptive_reference(log_mel[0, : length[0]], DEFAULT_PRIOR_FRAMES)
    expected, _ = ref.quartznet_forward(
        features, bundle.model.get_config(), _weights(bundle.model), right_padding=EXPECTED_RIGHT
    )
    np.testing.assert_allclose(stream.logprobs, expected, atol=2e-3)


@functools.cache
def stream_export():
    base = su.workdir() / "stream-exports"
    model = save_model_dir(su.workdir() / "stream-model", lookahead_bundle(), serving=False)
    status, _, err = run_qn(
        ["export", "--model", str(model), "--out", str(base), "--name", "la", "--tflite", "float32"]
    )
    assert status == 0, err
    return model, base / "la" / "1"


def test_exported_stream_step_and_tflite_equal_the_python_stream():
    from serving.recognizer import load_recognizer
    from serving.streaming import TFLiteStreamStep, streaming_recognizer

    _, version = stream_export()
    meta = json.loads((version / "assets.extra" / "qn_export.json").read_text())
    assert meta["streaming"]["signature"] == "stream_step"
    assert meta["streaming"]["state_size"] > 0
    audio = _stream_audio()
    settings = StreamSettings(keep_logprobs=True)
    python = StreamingRecognizer.from_bundle(lookahead_bundle(), settings)
    expected_text, _ = _feed(python, audio, [1600])
    served = streaming_recognizer(load_recognizer(version), settings)
    assert served.mode == "stateful"
    text, _ = _feed(served, audio, [1600])
    assert text == expected_text
    np.testing.assert_allclose(served.logprobs, python.logprobs, atol=1e-5, rtol=0)
    tflite = TFLiteStreamStep(version / "tflite" / "stream_float32.tflite")
    engine = StatefulEngine(tflite, tflite.info, lookahead_bundle().featurizer, settings)
    lite = StreamingRecognizer(engine, lookahead_bundle().tokenizer.labels, settings)
    text, _ = _feed(lite, audio, [1000, 7])
    assert text == expected_text
    np.testing.assert_allclose(lite.logprobs, python.logprobs, atol=1e-5, rtol=0)


def test_stream_step_signature_carries_the_text_and_refuses_foreign_state():
    from serving.recognizer import load_recognizer

    _, version = stream_export()
    step = load_recognizer(version).owner.signatures["stream_step"]
    audio = tf.constant(_stream_audio()[None, :16000])
    out = step(
        audio=audio,
        state=tf.zeros([1, 0]),
        counters=tf.zeros([1, 3], tf.int32),
        end=tf.constant([-1]),
        text=tf.constant(["so far "]),
    )
    emitted = out["emitted"].numpy()[0]
    labels = lookahead_bundle().tokenizer.labels
    assert out["text"].numpy()[0].decode() == "so far " + "".join(
        labels[i] for i in emitted if i >= 0
    )
    state, counters = out["state"], out["counters"].numpy()
    foreign = counters.copy()
    foreign[0, 0] += 1
    cases = [
        ({"counters": tf.constant(foreign)}, "another model"),
        ({"state": state[:, :-1]}, "values per stream"),
        ({"audio": audio[:, :1000]}, "multiple of 320"),
        ({"audio": audio * np.nan}, "non-finite"),
    ]
    for change, message in cases:
        inputs = {
            "audio": audio,
            "state": state,
            "counters": tf.constant(counters),
            "end": tf.constant([-1]),
            "text": tf.constant([""]),
            **change,
        }
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            step(**inputs)


# Buffered mode -------------------------------------------------------------------------------


def test_buffered_stream_with_whole_context_equals_whole_file():
    """Context covering the whole stream: running statistics at finish() are the utterance's
    own, so buffered streaming of a full-context model gives serving_default's log-probs."""
    bundle = su.tiny_bundle()
    audio = _stream_audio()
    settings = StreamSettings(
        mode="buffered", left_seconds=10, right_seconds=10, keep_logprobs=True
    )
    stream = StreamingRecognizer.from_bundle(bundle, settings)
    assert stream.mode == "buffered"
    text, updates = _feed(stream, audio, [1000, 2001])
    expected, lengths = su.keras_reference()(audio[None], np.array([len(audio)]))
    np.testing.assert_allclose(stream.logprobs, expected[0, : lengths[0]], atol=1e-5)
    assert text == su.greedy_texts(expected, lengths)[0].strip()


def test_buffered_adaptive_stream_with_the_receptive_field_equals_offline():
    from serving.transcribe import receptive_field_seconds

    bundle = lookahead_bundle()
    field = receptive_field_seconds(bundle.model.block_args)
    audio = _stream_audio()
    settings = StreamSettings(
        mode="buffered",
        chunk_seconds=0.4,
        left_seconds=2 * field,  # look-ahead padding moves up to the whole kernel to the past
        right_seconds=field,
        normalization="adaptive",
        keep_logprobs=True,
    )
    stream = StreamingRecognizer.from_bundle(bundle, settings)
    _, updates = _feed(stream, audio, [1600])
    np.testing.assert_allclose(stream.logprobs, _offline(bundle, audio), atol=1e-5)
    # Final text only grows; some update showed a partial guess ahead of it.
    texts = [u.text for u in updates]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert any(u.partial for u in updates)


def test_buffered_memory_stays_bounded():
    bundle = su.tiny_bundle()
    stream = StreamingRecognizer.from_bundle(bundle, StreamSettings(mode="buffered"))
    audio = np.tile(_stream_audio(), 4)  # ~16 s
    _feed(stream, audio, [1600])
    engine = stream.engine
    assert engine.max_piece_samples < 2 * 16000
    assert len(engine.frames) < 500 and len(engine.audio) < 16000


# Bad input -----------------------------------------------------------------------------------


def test_feed_refuses_bad_samples():
    stream = StreamingRecognizer.from_bundle(su.tiny_bundle(), StreamSettings(mode="buffered"))
    with pytest.raises(UserInputError, match="floating point"):
        stream.feed(np.zeros(100, np.int16))
    with pytest.raises(UserInputError, match="mono"):
        stream.feed(np.zeros((100, 2), np.float32))
    with pytest.raises(UserInputError, match="finite"):
        stream.feed(np.full(100, np.nan, np.float32))
    stream.feed(np.zeros(100, np.float32))
    with pytest.raises(UserInputError, match="fewer than the 320"):
        stream.finish()
    with pytest.raises(UserInputError, match="finished"):
        stream.feed(np.zeros(100, np.float32))


def test_stateful_mode_needs_a_lookahead_model_and_a_prior():
    with pytest.raises(UserInputError, match="buffered mode"):
        StreamingRecognizer.from_bundle(su.tiny_bundle(), StreamSettings(mode="stateful"))
    bundle = lookahead_bundle()
    without = ModelBundle(bundle.model, bundle.tokenizer, bundle.featurizer, metadata={})
    with pytest.raises(UserInputError, match="qn model prior"):
        StreamingRecognizer.from_bundle(without, StreamSettings(mode="stateful"))
    assert StreamingRecognizer.from_bundle(without).mode == "buffered"  # auto falls back
    legacy = ModelBundle(
        bundle.model, bundle.tokenizer, FeaturizerConfig(era="legacy"), metadata=bundle.metadata
    )
    with pytest.raises(UserInputError, match="'current' front end"):
        StreamingRecognizer.from_bundle(legacy, StreamSettings(mode="stateful"))
    with pytest.raises(UserInputError, match="buffered mode"):
        StreamingRecognizer.from_bundle(
            bundle, StreamSettings(mode="stateful", normalization="running")
        )


def _wav_header(rate, channels=1, bits=16) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * bits // 8, 2, bits)
    return (
        b"RIFF\xff\xff\xff\xffWAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data\xff\xff\xff\xff"
    )


def test_stdin_pcm_accepts_raw_and_matching_wav_and_refuses_the_rest():
    from qn_cli.streaming import stdin_blocks

    pcm = (np.arange(-800, 800, dtype=np.int16) * 20).tobytes()
    raw = np.concatenate(list(stdin_blocks(16000, io.BytesIO(pcm))))
    np.testing.assert_array_equal(raw, np.frombuffer(pcm, "<i2") / 32768.0)
    wav = np.concatenate(list(stdin_blocks(16000, io.BytesIO(_wav_header(16000) + pcm))))
    np.testing.assert_array_equal(wav, raw)
    with pytest.raises(UserInputError, match="at 8000 Hz.*-r 16000"):
        list(stdin_blocks(16000, io.BytesIO(_wav_header(8000) + pcm)))
    with pytest.raises(UserInputError, match="2-channel"):
        list(stdin_blocks(16000, io.BytesIO(_wav_header(16000, channels=2) + pcm)))
    with pytest.raises(UserInputError, match="middle of a 16-bit sample"):
        list(stdin_blocks(16000, io.BytesIO(pcm + b"\x01")))


# CLI -----------------------------------------------------------------------------------------


def test_qn_transcribe_stream_file_and_stdin(tmp_path, monkeypatch):
    model, _ = stream_export()
    audio = _stream_audio()
    expected, _ = _feed(StreamingRecognizer.from_bundle(lookahead_bundle()), audio, [1600])
    path = tmp_path / "clip.wav"
    path.write_bytes(su.wav_file_bytes(audio, 16000, "FLOAT"))
    out_file = tmp_path / "out.jsonl"
    status, out, err = run_qn(
        [
            "transcribe",
            "--model",
            str(model),
            "--stream",
            str(path),
            "--no-realtime",
            "--output",
            str(out_file),
        ]
    )
    assert status == 0, err
    assert out.strip() == f"{path}\t{expected}"
    record = json.loads(out_file.read_text())
    assert record["stream_mode"] == "stateful" and record["pred_text"] == expected
    assert 0 < record["latency_seconds"] < 1.3
    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pcm)))
    status, out, err = run_qn(["transcribe", "--model", str(model), "--stream", "-"])
    assert status == 0, err
    assert out.strip().split("\t")[0] == "-"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(_wav_header(44100) + pcm)))
    status, _, err = run_qn(["transcribe", "--model", str(model), "--stream", "-"])
    assert status == 2 and "44100 Hz" in err


def test_qn_client_stream_against_qn_serve():
    """Streams through `qn serve` with the state held by the client: the text equals the
    Python stream's; a stream abandoned half way leaves the server serving the others."""
    from serving import client as qc
    from serving.server import LocalModelServer, ServerConfig

    _, version = stream_export()
    audio = _stream_audio()
    expected, _ = _feed(StreamingRecognizer.from_bundle(lookahead_bundle()), audio, [1600])
    config = ServerConfig(rest_port=0, grpc_port=0)
    with LocalModelServer(version.parent, config) as server:
        url = f"http://127.0.0.1:{server.rest_port}"
        rest = qc.RestClient(url, "la", timeout=60)
        abandoned = StreamingRecognizer(
            StatefulEngine(qc.RemoteStreamStep(rest), None, FeaturizerConfig(), StreamSettings()),
            lookahead_bundle().tokenizer.labels,
            StreamSettings(),
        )
        abandoned.feed(audio[:40000])  # two steps, then the client goes away
        rest.close()
        results = []

        def stream_once(use_grpc):
            if use_grpc:
                client = qc.GrpcClient(f"127.0.0.1:{server.grpc_port}", "la", timeout=60)
            else:
                client = qc.RestClient(url, "la", timeout=60)
            engine = StatefulEngine(
                qc.RemoteStreamStep(client), None, FeaturizerConfig(), StreamSettings()
            )
            stream = StreamingRecognizer(
                engine, lookahead_bundle().tokenizer.labels, StreamSettings()
            )
            results.append(_feed(stream, audio, [1600])[0])
            client.close()

        threads = [threading.Thread(target=stream_once, args=(i % 2,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [expected] * 4
        path = su.workdir() / "stream-client.wav"
        path.write_bytes(su.wav_file_bytes(audio, 16000, "FLOAT"))
        status, out, err = run_qn(
            ["client", "--url", url, "--model", "la", "--stream", str(path), "--no-realtime"]
        )
        assert status == 0, err
        assert out.strip() == f"{path}\t{expected}"


def test_qn_model_prior(tmp_path):
    bundle = su.tiny_bundle()
    folder = save_model_dir(tmp_path / "m", bundle, serving=False)
    status, out, err = run_qn(["model", "prior", str(folder), *su.sample_paths(4)])
    assert status == 0, err
    meta = json.loads((folder / "qn_model.json").read_text())["metadata"]
    prior_written = FeaturePrior.from_dict(meta[METADATA_KEY])
    assert prior_written.utterances == 4 and prior_written.num_mels == 64
    status, _, err = run_qn(["model", "prior", str(folder), str(tmp_path / "missing.wav")])
    assert status == 2 and "Not found" in err


# Models trained for streaming: the front end normalizes causally ------------------------------


@functools.cache
def causal_bundle() -> ModelBundle:
    """The look-ahead model with a front end that normalizes frame-causally (what a training
    config with ``featurizer: {normalize: adaptive}`` makes)."""
    bundle = lookahead_bundle()
    featurizer = FeaturizerConfig(
        normalize="adaptive",
        prior_mean=prior().mean,
        prior_std=prior().std,
        prior_frames=100.0,
    )
    return ModelBundle(bundle.model, bundle.tokenizer, featurizer, metadata={})


def test_causal_front_end_normalizes_frame_by_frame():
    bundle = causal_bundle()
    audio = _stream_audio()
    layer = bundle.featurizer_layer()
    features, length = layer(audio[None], tf.constant([len(audio)]))
    log_mel, _ = layer.log_mel(audio[None], [len(audio)])
    n = int(length[0])
    expected = _adaptive_reference(log_mel[0, :n].numpy(), 100.0)
    np.testing.assert_allclose(features[0, :n].numpy(), expected, atol=1e-5)
    # Frame t does not depend on later audio.
    cut, _ = layer(audio[None, :24000], tf.constant([24000]))
    np.testing.assert_allclose(cut[0, :140].numpy(), features[0, :140].numpy(), atol=1e-6)
    with pytest.raises(UserInputError, match="needs prior_mean"):
        FeaturizerConfig(normalize="adaptive") and ModelBundle(
            bundle.model, bundle.tokenizer, FeaturizerConfig(normalize="adaptive")
        ).featurizer_layer()
    with pytest.raises(UserInputError, match="64 values"):
        FeaturizerConfig(normalize="fixed", prior_mean=(0.0,), prior_std=(1.0,))


def test_stream_of_a_causal_model_equals_its_serving_default():
    """Streaming = offline through the offline graph itself: serving_default of the model
    (the SavedModel TF Serving runs) gives the stream's log-probs."""
    from qn_keras.inference import SpeechRecognizer

    bundle = causal_bundle()
    audio = _stream_audio()
    stream = StreamingRecognizer.from_bundle(bundle, StreamSettings(keep_logprobs=True))
    assert stream.mode == "stateful"
    text, _ = _feed(stream, audio, [1, 1599, 4800, 320])
    module = SpeechRecognizer(bundle)  # bound tf.functions hold it weakly
    out = module.serving_default(tf.constant(audio[None]), tf.constant([len(audio)]))
    n = int(out["logprob_lengths"][0])
    np.testing.assert_allclose(stream.logprobs, out["logprobs"][0, :n].numpy(), atol=1e-5)
    assert text == out["transcripts"].numpy()[0].decode().strip()
    with pytest.raises(UserInputError, match="trained with 'adaptive'"):
        StreamingRecognizer.from_bundle(bundle, StreamSettings(normalization="fixed"))
    # Buffered mode of the same model normalizes the same way.
    buffered = StreamingRecognizer.from_bundle(
        bundle, StreamSettings(mode="buffered", left_seconds=8, right_seconds=8, keep_logprobs=True)
    )
    _feed(buffered, audio, [1600])
    np.testing.assert_allclose(buffered.logprobs, stream.logprobs, atol=1e-5)


def test_training_data_must_match_the_causal_front_end():
    from qn_keras.training.data import DataSource

    per_utterance = DataSource("x", 1, 0.1, "feats/train", featurizer=FeaturizerConfig().to_dict())
    with pytest.raises(UserInputError, match="normalize"):
        per_utterance.check_compatible(causal_bundle().tokenizer, causal_bundle().featurizer)


def test_trainer_fills_in_the_front_end_prior_from_training_audio():
    from types import SimpleNamespace

    from qn_keras.training.run_setup import RunSpec
    from qn_keras.training.trainer import Trainer

    said = []
    fake = SimpleNamespace(_say=said.append)
    run = RunSpec({}, (), FeaturizerConfig(normalize="adaptive").to_dict(), None, False, {})
    manifest = str(su.SAMPLE_DEV)
    filled = Trainer._with_front_end_prior(fake, run, manifest)
    config = FeaturizerConfig.from_dict(filled.featurizer)
    assert config.normalize == "adaptive" and config.prior_mean is not None
    from qn_keras.featurizer import LogMelSpectrogram
    from qn_keras.streaming.prior import prior_from_audio

    expected = prior_from_audio(su.sample_paths(200), LogMelSpectrogram(), limit=200)
    np.testing.assert_allclose(config.prior_mean, expected.mean, rtol=1e-9)
    assert said and "prior" in said[0]


def test_pooled_normalization_pools_heard_frames_with_the_prior():
    from qn_keras.streaming.normalization import Normalizer

    frames = np.random.default_rng(5).normal(-3, 2, size=(150, 64))
    normalizer = Normalizer("pooled", 64, prior(), prior_frames=50)
    normalizer.add(frames[:120])
    got = normalizer.normalize(frames[100:120])
    mu0, var0 = np.asarray(prior().mean), np.asarray(prior().std) ** 2
    heard = frames[:120]
    mean = (50 * mu0 + heard.sum(0)) / 170
    second = (50 * (var0 + mu0**2) + (heard**2).sum(0)) / 170
    expected = (frames[100:120] - mean) / (np.sqrt(second - mean**2) + 1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # running: the heard frames' own statistics (unbiased std, as the featurizer).
    alone = Normalizer("running", 64, prior())
    alone.add(frames[:120])
    expected = (frames[100:120] - heard.mean(0)) / (heard.std(0, ddof=1) + 1e-5)
    np.testing.assert_allclose(alone.normalize(frames[100:120]), expected, atol=1e-5)


def test_lookahead_is_searchable_by_qn_tune():
    from qn_keras.tuning.config import SpaceConfig
    from qn_keras.tuning.search_space import architecture, describe

    space = SpaceConfig.from_dict({"lookahead": [-1, 24]})
    assert space.params["lookahead"].candidates == (-1, 24)
    values = {
        "blocks": 5,
        "repeats": 3,
        "groups": 1,
        "width": 0.5,
        "kernel_factor": 1.0,
        "dropout": 0.0,
        "lookahead": 24,
    }
    kwargs = architecture(values, space)
    assert kwargs["lookahead"] == 24 and describe(values).endswith("la24")
    assert "lookahead" not in architecture({**values, "lookahead": -1}, space)
    with pytest.raises(ValueError, match="lookahead"):
        SpaceConfig.from_dict({"lookahead": [-2]})
    model = QuartzNetCTC(vocabulary_size=29, **kwargs)
    assert model.lookahead == 24


def test_trainer_saves_a_feature_prior_or_says_why_not(tmp_path):
    from types import SimpleNamespace

    from qn_keras.training.trainer import Trainer

    said = []
    fake = SimpleNamespace(_say=said.append, train_data=SimpleNamespace(path=str(su.SAMPLE_DEV)))
    got = Trainer._feature_prior(fake, su.tiny_bundle())
    assert got is not None and got.utterances == 60
    bad = tmp_path / "records.tfrecord"
    bad.write_bytes(b"")
    fake.train_data = SimpleNamespace(path=str(bad))
    assert Trainer._feature_prior(fake, su.tiny_bundle()) is None
    assert "qn model prior" in said[-1]


def test_buffered_stream_over_an_export_equals_the_model_folders():
    from serving.recognizer import load_recognizer
    from serving.streaming import streaming_recognizer

    audio = _stream_audio()
    settings = StreamSettings(keep_logprobs=True)
    folder = StreamingRecognizer.from_bundle(su.tiny_bundle(), settings)
    _feed(folder, audio, [1600])
    export = streaming_recognizer(load_recognizer(su.export_dir()), settings)
    assert export.mode == "buffered"  # a full-context model
    _feed(export, audio, [1600])
    np.testing.assert_allclose(export.logprobs, folder.logprobs, atol=1e-4)
    with pytest.raises(UserInputError, match="no stream_step"):
        streaming_recognizer(load_recognizer(su.export_dir()), StreamSettings(mode="stateful"))


def test_the_streaming_demo_recipe_builds_a_streamable_model():
    from pathlib import Path

    from qn_keras.presets import build_from_architecture, with_vocabulary
    from qn_keras.quartznet_backbone import total_lookahead
    from qn_keras.training import load_config
    from qn_keras.training.config import architecture_from_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_streaming.yaml")
    front_end = config.featurizer_config()
    assert front_end.normalize == "adaptive" and front_end.prior_frames == 100
    model = build_from_architecture(with_vocabulary(architecture_from_config(config.model), 29))
    assert total_lookahead(model.block_args, 1.0, model.lookahead) == 24


def test_trainer_reuses_a_causal_front_ends_prior():
    from types import SimpleNamespace

    from qn_keras.training.trainer import Trainer

    fake = SimpleNamespace(_say=None, train_data=None)  # nothing to read: it must not
    got = Trainer._feature_prior(fake, causal_bundle())
    assert got.mean == causal_bundle().featurizer.prior_mean
