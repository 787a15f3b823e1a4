"""`qn export`: the version folder's layout, its op set, and signature and TFLite parity with
the Keras model (reloaded with tf.saved_model.load, as tensorflow/models' export tests do)."""

from __future__ import annotations

import numpy as np
import pytest
import serving_utils as su
import tensorflow as tf
from google.protobuf import text_format
from parity import SAME_MODEL_RTOL, assert_logprobs_close
from tensorflow_serving.config import model_server_config_pb2

from serving import export
from serving.tflite import TFLiteRecognizer


def test_layout_and_server_config():
    version_dir = su.export_dir()
    base = version_dir.parent
    assert version_dir.name == "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables").is_dir()
    assert sorted(p.name for p in (version_dir / "tflite").iterdir()) == [
        "dynamic.tflite",
        "encoder_dynamic.tflite",
        "encoder_float16.tflite",
        "encoder_float32.tflite",
        "featurizer.tflite",
        "float16.tflite",
        "float32.tflite",
    ]
    assert not [p for p in base.iterdir() if p.name.startswith(".")]  # no temp leftovers

    config = text_format.Parse(
        (base / export.MODELS_CONFIG).read_text(), model_server_config_pb2.ModelServerConfig()
    )
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("qn", "/models/qn", "tensorflow")
    assert model.model_version_policy.latest.num_versions == 1

    batching = (base / export.BATCHING_FILE).read_text()
    keys = {line.split()[0].rstrip(":") for line in batching.splitlines() if line.strip()}
    assert keys == {
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "allowed_batch_sizes",
        "pad_variable_length_inputs",
    }
    assert "pad_variable_length_inputs: true" in batching


def test_only_stock_ops():
    ops = export.saved_model_ops(su.export_dir())
    assert {"RFFT", "DecodeRaw", "Substr", "Conv2D", "ReduceJoin"} <= ops  # graph is all there
    assert ops <= export.STOCK_OPS, sorted(ops - export.STOCK_OPS)
    assert not [
        op for op in ops if ">" in op
    ]  # tensorflow-io / addons ops are "IO>...", "Addons>..."
    # Every allowlisted op is a core TensorFlow op (tf.raw_ops lists core ops only).
    assert [op for op in export.STOCK_OPS if not hasattr(tf.raw_ops, op)] == []


def test_signatures_match_keras():
    loaded = su.loaded_export()
    assert set(loaded.signatures) == {"serving_default", "transcribe_wav"}
    batch, lengths = su.pad(su.sample_waveforms())
    ref_logprobs, ref_lengths = su.keras_reference()(batch, lengths)
    out = loaded.signatures["serving_default"](
        waveform=tf.constant(batch), lengths=tf.constant(lengths)
    )
    np.testing.assert_array_equal(out["logprob_lengths"].numpy(), ref_lengths)
    assert_logprobs_close(out["logprobs"].numpy(), ref_logprobs, ref_lengths)
    transcripts = [t.decode() for t in out["transcripts"].numpy()]
    assert transcripts == su.greedy_texts(ref_logprobs, ref_lengths)
    assert len(set(transcripts)) > 1  # the random model does say different things


def test_transcribe_wav_any_pcm_width_rate_and_channels():
    """In-graph WAV parsing + resampling vs decode_audio (soundfile + scipy) then
    serving_default, for one batch of differently encoded files of different lengths."""
    from qn_keras.audio import decode_audio

    loaded = su.loaded_export()
    cases = [
        ("PCM_U8", 8000, 1),
        ("PCM_16", 16000, 1),
        ("PCM_24", 44100, 2),
        ("PCM_32", 22050, 2),
        ("FLOAT", 48000, 1),
        ("DOUBLE", 16000, 2),
    ]
    from scipy.signal import resample_poly

    files = []
    for i, (subtype, rate, channels) in enumerate(cases):
        wave = su.sample_waveforms()[i]
        native = resample_poly(wave, rate, 16000) if rate != 16000 else wave
        audio = np.stack([native, 0.5 * native], axis=1)[:, :channels]
        files.append(su.wav_file_bytes(np.clip(audio, -1, 1), rate, subtype))
    decoded = [decode_audio(f) for f in files]
    batch, lengths = su.pad(decoded)
    ref = loaded.signatures["serving_default"](
        waveform=tf.constant(batch), lengths=tf.constant(lengths)
    )
    out = loaded.signatures["transcribe_wav"](wav_bytes=tf.constant(files))
    np.testing.assert_array_equal(out["logprob_lengths"], ref["logprob_lengths"])
    # The in-graph resampler reproduces scipy's resample_poly to ~1e-7 of full scale on the
    # waveform; through the model that is well under the same-model tolerance.
    assert_logprobs_close(
        out["logprobs"].numpy(), ref["logprobs"].numpy(), ref["logprob_lengths"].numpy()
    )
    np.testing.assert_array_equal(out["transcripts"], ref["transcripts"])


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"not a wav file at all", r"wav_bytes\[1\]: audio is not a WAV file"),
        ("ulaw", "unsupported WAV encoding"),
        ("short", "too short to transcribe"),
    ],
)
def test_transcribe_wav_rejects_bad_audio(payload, message):
    loaded = su.loaded_export()
    good = su.wav_file_bytes(su.sample_waveforms()[0], 16000, "PCM_16")
    if payload == "ulaw":
        payload = su.wav_file_bytes(su.sample_waveforms()[0], 16000, "ULAW")
    elif payload == "short":
        payload = su.wav_file_bytes(np.zeros(100, np.float32), 16000, "PCM_16")
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures["transcribe_wav"](wav_bytes=tf.constant([good, payload]))


def test_warmup_requests_replay():
    requests = export.read_warmup_file(su.export_dir() / "assets.extra" / export.WARMUP_FILE)
    assert [r.model_spec.signature_name for r in requests] == ["serving_default", "transcribe_wav"]
    loaded = su.loaded_export()
    for request in requests:
        assert request.model_spec.name == su.MODEL_NAME
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](**inputs)
        assert out["logprobs"].shape[0] == len(next(iter(inputs.values())))


# Relative to each frame's scale (tests/parity.py). float32 is the same arithmetic. float16
# weights carry 2^-11 relative rounding and dynamic-range int8 weights 1/254 of each tensor's
# range; measured worst 1.1e-4 (float16) and 1.5e-3 (dynamic) of scale on this model, hence
# 1e-3 and 1e-2. Both stay below a dropped mask (6e-2 of scale, tests/test_parity_tolerances.py).
@pytest.mark.parametrize(
    "mode, rtol, engine, split",
    [
        ("float32", SAME_MODEL_RTOL, "xnnpack", True),
        ("float32", SAME_MODEL_RTOL, "xnnpack", False),
        ("float32", SAME_MODEL_RTOL, "builtin", True),
        ("float32", SAME_MODEL_RTOL, "litert", True),
        ("float32", SAME_MODEL_RTOL, "litert", False),
        ("float16", 1e-3, "xnnpack", True),
        ("dynamic", 1e-2, "xnnpack", True),
        ("dynamic", 1e-2, "litert", True),
    ],
)
def test_tflite_matches_keras(mode, rtol, engine, split):
    path = su.export_dir() / "tflite" / f"{mode}.tflite"
    runner = TFLiteRecognizer(path, num_threads=2, engine=engine, split=split)
    assert runner.split == split and runner.engine == engine
    reference = su.keras_reference()
    mismatched = 0
    for waveform in su.sample_waveforms():
        ref_logprobs, ref_lengths = reference(waveform[None, :], np.array([len(waveform)]))
        logprobs = runner.logprobs(waveform)
        # The TFLite graphs return the valid frames only (the Keras graph one padded frame more).
        valid = int(ref_lengths[0])
        assert logprobs.shape == ref_logprobs[0, :valid].shape
        assert_logprobs_close(logprobs, ref_logprobs[0, :valid], rtol=rtol, what=f"TFLite {mode}")
        mismatched += su.greedy_texts(logprobs[None], ref_lengths) != su.greedy_texts(
            ref_logprobs, ref_lengths
        )
    # LiteRT's dynamic-range kernels quantize activations on the fly (XNNPACK's QD8): within
    # the same 1e-2 of scale, one of this random model's close greedy calls may flip.
    assert mismatched <= (1 if (mode, engine) == ("dynamic", "litert") else 0)
    with pytest.raises(ValueError, match="Unknown TFLite engine 'gpu'"):
        TFLiteRecognizer(path, engine="gpu")


def test_tflite_runner_refuses_what_the_savedmodel_refuses():
    """TFLite has no graph assertions: the runner checks the waveform itself. (It also refuses
    non-finite outputs, which the graph makes out of non-finite features; but TFLite's kernels
    saturate where TensorFlow's overflow: even +-3e38 audio gives finite TFLite features, with
    XNNPACK and with the built-in kernels, so that case is shown on the graph below.)"""
    from qn_keras.audio import AudioError

    runner = TFLiteRecognizer(su.export_dir() / "tflite" / "float32.tflite", num_threads=1)
    assert runner.min_samples == 320  # from the export's qn_model.json
    good = su.sample_waveforms()[0]
    nan = good.copy()
    nan[100] = np.nan
    cases = {
        "non_finite": nan,
        "too_short": good[:100],
        "empty_audio": good[:0],
    }
    for reason, waveform in cases.items():
        with pytest.raises(AudioError) as error:
            runner.logprobs(waveform, name="clip.wav")
        assert error.value.reason == reason and "clip.wav" in str(error.value)
    assert np.all(np.isfinite(runner.logprobs(good)))


def test_tflite_graph_turns_non_finite_features_into_nan_outputs():
    """The guard in the converted function itself: features that overflow (1e30 full scale
    in TensorFlow's STFT) give NaN log-probs, which no kernel's NaN handling can hide."""
    from serving.tflite import WaveformToLogprobs

    module = WaveformToLogprobs(su.tiny_bundle())
    good = su.sample_waveforms()[0][None]
    assert np.all(np.isfinite(module.logprobs(tf.constant(good))["logprobs"].numpy()))
    assert np.all(np.isnan(module.logprobs(tf.constant(good * 1e30))["logprobs"].numpy()))


def test_versions_are_never_overwritten(tmp_path):
    bundle = su.tiny_bundle()
    (tmp_path / "qn" / "4").mkdir(parents=True)  # an existing version, say a previous export
    with pytest.raises(FileExistsError, match="Version 4 already exists"):
        export.export_model(bundle, tmp_path, "qn", version=4, warmup=False)
    with pytest.raises(ValueError, match="Model name"):
        export.export_model(bundle, tmp_path, "../evil", warmup=False)
    with pytest.raises(ValueError, match="Unknown TFLite mode"):
        export.export_model(bundle, tmp_path, "qn", tflite_modes=("int4",))
    assert export.existing_versions(tmp_path / "qn") == [4]  # nothing half-written


def test_engines_without_litert_fall_back_or_say_what_to_install(monkeypatch):
    from qn_keras import tflite as lite
    from qn_keras.errors import UserInputError

    path = su.export_dir() / "tflite" / "float32.tflite"
    monkeypatch.setattr(lite, "litert_available", lambda: False)
    assert lite.resolve_engine("auto") == "xnnpack"
    assert TFLiteRecognizer(path, engine="auto").engine == "xnnpack"
    with pytest.raises(UserInputError, match=r"pip install 'qn-keras\[litert\]'"):
        TFLiteRecognizer(path, engine="litert")
    with pytest.raises(FileNotFoundError, match="encoder_float32.tflite"):
        TFLiteRecognizer(
            path, split=True, encoder=path.parent / "missing" / "encoder_float32.tflite"
        )
