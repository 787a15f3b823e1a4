"""NeMo checkpoint import without NeMo: config parsing (both yaml styles), weight mapping
against a NumPy forward that walks NeMo's own module lists, both front-end eras, bad input.

The NumPy forward below is transcribed from NeMo's `JasperBlock` (it builds the `mconv`
module list the way NeMo's constructor does and runs it in order), and reads the NeMo state
dict by key; it shares no code with `qn_keras.nemo`. The parity test against NeMo itself is
`tests/nemo/` (`make test-nemo`).
"""

from __future__ import annotations

import copy
import io
import tarfile

import numpy as np
import pytest
import reference_numpy as ref
import tensorflow as tf
import yaml
from parity import FLOAT64_REFERENCE_RTOL, worst_relative_error

from qn_cli.main import main as qn_main
from qn_keras.nemo import NemoImportError, choose_era, convert, expected_state_dict
from qn_keras.nemo.archive import load_state_dict, read_nemo, read_nemo_members
from qn_keras.nemo.config import parse_model_config

LABELS = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]
# Features: absolute in units of the normalised features' standard deviation (see
# tests/test_featurizer.py). Log-probs: relative to each frame's scale (tests/parity.py).
TOLERANCE = 1e-4


def blk(filters, kernel, repeat=1, stride=1, dilation=1, residual=False, separable=True, **kw):
    return dict(
        filters=filters,
        repeat=repeat,
        kernel=[kernel],
        stride=[stride],
        dilation=[dilation],
        dropout=0.0,
        residual=residual,
        separable=separable,
        **kw,
    )


TINY_QUARTZNET = [
    blk(16, 7, stride=2),
    blk(16, 5, repeat=3, residual=True),
    blk(24, 9, repeat=2, residual=True),
    blk(24, 11, dilation=2),
    blk(32, 1, separable=False),
]
TINY_GROUPED_SE = [
    blk(16, 7, stride=2),
    blk(
        16,
        9,
        repeat=3,
        residual=True,
        groups=2,
        se=True,
        se_reduction_ratio=4,
        kernel_size_factor=0.5,
    ),  # fmt: skip
    blk(32, 5, repeat=2, residual=True, groups=4, se=True, se_reduction_ratio=4),
    blk(32, 1, separable=False, se=True, se_reduction_ratio=4),
]
TINY_JASPER_DR = [
    blk(16, 5, stride=2, separable=False),
    blk(16, 3, repeat=2, residual=True, separable=False, residual_dense=True),
    blk(24, 3, repeat=2, residual=True, separable=False, residual_dense=True),
    blk(24, 5, repeat=2, residual=True, separable=False, residual_dense=True),
    blk(32, 1, separable=False),
]


def flat_config(blocks, activation="relu", nemo_version=None, conv_mask=True, **preprocessor):
    config = {
        "sample_rate": 16000,
        "labels": LABELS,
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "normalize": "per_feature",
            "window_size": 0.02,
            "window_stride": 0.01,
            "window": "hann",
            "features": 64,
            "n_fft": 512,
            "frame_splicing": 1,
            "dither": 1e-5,
            **preprocessor,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConvASREncoder",
            "feat_in": 64,
            "activation": activation,
            "conv_mask": conv_mask,
            "jasper": copy.deepcopy(blocks),
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": blocks[-1]["filters"],
            "num_classes": 28,
            "vocabulary": "${labels}",
        },
        "target": "nemo.collections.asr.models.ctc_models.EncDecCTCModel",
    }
    if nemo_version:
        config["nemo_version"] = nemo_version
    return config


def cls_params_config(blocks, **kw):
    """The early-1.0 style of QuartzNet15x5Base-En: `cls:` + `params:` nodes, no target."""
    flat = flat_config(blocks, **kw)
    out = {"sample_rate": 16000, "labels": LABELS}
    for name in ("preprocessor", "encoder", "decoder"):
        node = dict(flat[name])
        out[name] = {"cls": node.pop("_target_"), "params": node}
    out["decoder"]["params"]["vocabulary"] = LABELS
    return out


def random_state_dict(config, seed=0):
    """A NeMo-style state dict (PyTorch layouts) for `config`, with random weights, BN
    statistics and a perturbed filterbank (so using the checkpoint's own buffer is visible)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in expected_state_dict(parse_model_config(config)).items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(7, dtype=np.int64)
        elif key.endswith("featurizer.window"):
            state[key] = ref.symmetric_hann_in_fft_frame()[96:416].astype(np.float32)
        elif key.endswith("featurizer.fb"):
            fb = ref.slaney_filterbank() * rng.uniform(0.5, 1.5, size=(64, 1))
            state[key] = fb[None].astype(np.float32)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = rng.normal(0.0, 0.3, size=shape).astype(np.float32)
        elif len(shape) == 1:  # BN gamma
            state[key] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            bound = np.sqrt(3.0 / fan_in)
            state[key] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return state


# --------------------------------------------------------------------------- NumPy NeMo


def compute_new_kernel_size(kernel, factor):
    new = max(int(kernel * factor), 1)
    return new + 1 if new % 2 == 0 else new


def nemo_block_modules(lcfg, inplanes):
    """The `mconv` list NeMo's JasperBlock.__init__ builds, as (kind, settings) tuples."""
    kernel = compute_new_kernel_size(lcfg["kernel"][0], lcfg.get("kernel_size_factor", 1.0))
    stride, dilation = lcfg["stride"][0], lcfg["dilation"][0]
    padding = dilation * (kernel - 1) // 2
    planes, groups = lcfg["filters"], lcfg.get("groups", 1)

    def conv_bn(cin):
        layers = []
        if lcfg.get("separable", False):
            layers.append(("conv", dict(k=kernel, s=stride, d=dilation, p=padding, g=cin)))
            layers.append(("conv", dict(k=1, s=1, d=1, p=0, g=groups)))
        else:
            layers.append(("conv", dict(k=kernel, s=stride, d=dilation, p=padding, g=groups)))
        layers.append(("bn", {}))
        if groups > 1:
            layers.append(("shuffle", dict(g=groups)))
        return layers

    mconv, cin = [], inplanes
    for _ in range(lcfg["repeat"] - 1):
        mconv += conv_bn(cin) + [("act", {}), ("dropout", {})]
        cin = planes
    mconv += conv_bn(cin)
    if lcfg.get("se", False):
        mconv.append(("se", {}))
    return mconv


def nemo_forward(features, config, state, conv_key=".conv.weight"):
    """NeMo's ConvASREncoder + ConvASRDecoder on ONE unpadded utterance `[T, 64]`, float64."""
    enc = config["encoder"].get("params", config["encoder"])
    act = {"relu": "relu", "swish": "swish", "silu": "swish"}[enc["activation"]]
    w = {k: np.asarray(v, np.float64) for k, v in state.items()}
    xs = [np.asarray(features, np.float64).T]
    feat_in, panes = enc["feat_in"], []
    for i, lcfg in enumerate(enc["jasper"]):
        dense = []
        if lcfg.get("residual_dense", False):
            panes.append(feat_in)
            dense = list(panes)
        out = xs[-1]
        for idx, (kind, c) in enumerate(nemo_block_modules(lcfg, feat_in)):
            key = f"encoder.encoder.{i}.mconv.{idx}"
            if kind == "conv":
                out = ref.conv1d(out, w[key + conv_key], c["s"], c["d"], c["p"], c["g"])
            elif kind == "bn":
                out = ref.batch_norm(out, *(w[f"{key}.{n}"] for n in
                                            ("weight", "bias", "running_mean", "running_var")))  # fmt: skip
            elif kind == "shuffle":
                out = ref.group_shuffle(out, c["g"])
            elif kind == "act":
                out = ref.activation(out, act)
            elif kind == "se":
                out = ref.squeeze_excite(
                    out, w[f"{key}.fc.0.weight"].T, w[f"{key}.fc.2.weight"].T, act
                )
        if lcfg["residual"]:
            sources = xs if dense else [xs[-1]]
            for p, source in enumerate(sources):
                key = f"encoder.encoder.{i}.res.{p}"
                res = ref.conv1d(source, w[f"{key}.0{conv_key}"])
                bn = [w[f"{key}.1.{n}"] for n in ("weight", "bias", "running_mean", "running_var")]
                out = out + ref.batch_norm(res, *bn)
        out = ref.activation(out, act)
        xs = xs + [out] if (lcfg["residual"] and dense) else [out]
        feat_in = lcfg["filters"]
    logits = (
        w["decoder.decoder_layers.0.weight"][:, :, 0] @ xs[-1]
        + w["decoder.decoder_layers.0.bias"][:, None]
    )
    return ref.log_softmax(logits.T)


# --------------------------------------------------------------------------- helpers


def waveforms(lengths, seed=3):
    """Speech-like test signals: harmonics with a moving pitch plus noise, zero-padded."""
    rng = np.random.default_rng(seed)
    batch = np.zeros((len(lengths), max(lengths)), np.float32)
    for b, n in enumerate(lengths):
        t = np.arange(n) / 16000.0
        f0 = 120 + 40 * np.sin(2 * np.pi * 1.5 * t + b)
        phase = 2 * np.pi * np.cumsum(f0) / 16000.0
        x = sum(np.sin(h * phase) / h for h in range(1, 8)) * 0.2
        batch[b, :n] = x + 0.01 * rng.standard_normal(n)
    return batch


def run_bundle(bundle, batch, lengths):
    features, feature_lengths = bundle.featurizer_layer()(batch, tf.constant(lengths, tf.int32))
    logprobs, out_lengths = bundle.model([features, feature_lengths], training=False)
    return features.numpy(), feature_lengths.numpy(), logprobs.numpy(), out_lengths.numpy()


def make_nemo_file(path, config, weights_bytes=b"not a checkpoint", gz=False):
    with tarfile.open(path, "w:gz" if gz else "w:") as tar:
        for name, data in (
            ("./model_config.yaml", yaml.safe_dump(config).encode()),
            ("./model_weights.ckpt", weights_bytes),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- parity


CASES = {
    # era chosen by default: no nemo_version (like the released checkpoints) -> legacy
    "quartznet_cls_params_legacy": (cls_params_config(TINY_QUARTZNET), None, "legacy"),
    "grouped_se_swish_current": (
        flat_config(TINY_GROUPED_SE, activation="swish", nemo_version="2.5.0"),
        None,
        "current",
    ),
    "jasper_dr_unmasked_legacy": (
        flat_config(TINY_JASPER_DR, nemo_version="2.4.1", conv_mask=False),
        None,
        "legacy",
    ),
    "quartznet_forced_current": (flat_config(TINY_QUARTZNET), "current", "current"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_numpy_nemo(case):
    config, era, expected_era = CASES[case]
    state = random_state_dict(config, seed=len(case))
    bundle = convert(config, state, era=era)
    assert bundle.featurizer.era == expected_era == bundle.metadata["era"]
    np.testing.assert_array_equal(bundle.filterbank, state["preprocessor.featurizer.fb"][0])
    np.testing.assert_array_equal(bundle.window, state["preprocessor.featurizer.window"])
    lengths = [8000, 5123]
    batch = waveforms(lengths)
    features, feature_lengths, logprobs, out_lengths = run_bundle(bundle, batch, lengths)
    ref_features, ref_lengths = ref.nemo_features(
        batch, lengths, era=expected_era, filterbank=state["preprocessor.featurizer.fb"][0]
    )
    np.testing.assert_array_equal(feature_lengths, ref_lengths)
    assert np.abs(features - ref_features).max() <= TOLERANCE
    conv_key = ".conv.weight" if config["encoder"].get("conv_mask", True) else ".weight"
    for b in range(len(lengths)):
        n = int(feature_lengths[b])
        expected = nemo_forward(ref_features[b, :n], config, state, conv_key)
        assert out_lengths[b] == len(expected) == -(-n // 2)
        worst = worst_relative_error(logprobs[b, : out_lengths[b]], expected)
        assert worst <= FLOAT64_REFERENCE_RTOL, f"{worst:.2e} of frame scale"


def test_both_config_styles_give_the_same_model():
    a = parse_model_config(flat_config(TINY_QUARTZNET))
    b = parse_model_config(cls_params_config(TINY_QUARTZNET))
    assert a.model_kwargs() == b.model_kwargs()
    assert a.labels == b.labels == tuple(LABELS)
    assert a.featurizer == b.featurizer


def test_quartznet_15x5_config_maps_to_the_preset():
    from qn_keras.presets import preset_kwargs

    groups = [(256, 33), (256, 39), (512, 51), (512, 63), (512, 75)]
    blocks = [blk(256, 33, stride=2)]
    blocks += [blk(f, k, repeat=5, residual=True) for f, k in groups for _ in range(3)]
    blocks += [blk(512, 87, dilation=2), blk(1024, 1, separable=False)]
    spec = parse_model_config(flat_config(blocks))
    kwargs = spec.model_kwargs()
    for key, value in preset_kwargs("quartznet_15x5").items():
        assert kwargs[key] == value, key
    shapes = expected_state_dict(spec)
    # spec section 4.1: 637 encoder/decoder entries + 2 preprocessor buffers
    assert len(shapes) == 639
    assert shapes["encoder.encoder.7.mconv.0.conv.weight"] == (256, 1, 51)
    assert shapes["encoder.encoder.7.mconv.1.conv.weight"] == (512, 256, 1)
    assert shapes["encoder.encoder.7.res.0.0.conv.weight"] == (512, 256, 1)
    assert shapes["encoder.encoder.15.mconv.22.running_var"] == (512,)
    assert shapes["encoder.encoder.16.mconv.0.conv.weight"] == (512, 1, 87)
    assert shapes["encoder.encoder.17.mconv.0.conv.weight"] == (1024, 512, 1)
    assert shapes["decoder.decoder_layers.0.weight"] == (29, 1024, 1)


def test_grouped_se_module_indices_follow_nemo():
    shapes = expected_state_dict(parse_model_config(flat_config(TINY_GROUPED_SE)))
    # repeat 3, groups 2: [dw, pw, bn, shuffle, act, drop] x2 + [dw, pw, bn, shuffle] + [se]
    assert shapes["encoder.encoder.1.mconv.6.conv.weight"] == (16, 1, 5)  # 9 * 0.5 -> 5
    assert shapes["encoder.encoder.1.mconv.13.conv.weight"] == (16, 8, 1)
    assert shapes["encoder.encoder.1.mconv.16.fc.0.weight"] == (4, 16)
    assert shapes["encoder.encoder.1.mconv.16.fc.2.weight"] == (16, 4)


def test_era_defaults_follow_the_saving_nemo_version():
    assert choose_era(None, None)[0] == "legacy"
    assert choose_era(None, "1.0.0rc1")[0] == "legacy"
    assert choose_era(None, "2.4.1")[0] == "legacy"
    assert choose_era(None, "2.5.0rc0")[0] == "current"
    assert choose_era(None, "3.0.0")[0] == "current"
    assert choose_era("current", "1.0.0")[0] == "current"
    with pytest.raises(NemoImportError, match="era must be one of"):
        choose_era("modern", None)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(target="nemo.collections.asr.models.EncDecRNNTModel"), "RNN-T"),
        (lambda c: c.update(tokenizer={"dir": "x", "type": "bpe"}), "subword"),
        (
            lambda c: c["encoder"].update(_target_="nemo.collections.asr.modules.ConformerEncoder"),
            "Conformer",
        ),
        (
            lambda c: c["preprocessor"].update(
                _target_="nemo.collections.asr.modules.AudioToMFCCPreprocessor"
            ),
            "AudioToMelSpectrogramPreprocessor",
        ),
        (lambda c: c["preprocessor"].update(normalize="all_features"), "normalize"),
        (lambda c: c["encoder"].update(activation="hardtanh"), "activation 'hardtanh'"),
        (lambda c: c["encoder"]["jasper"][0].update(repeat=3), "stride 2 with repeat 3"),
        (lambda c: c["encoder"]["jasper"][1].update(future_context=2), "future_context"),
        (lambda c: c["decoder"].update(vocabulary=["ab", "c"]), "single characters"),
        (lambda c: c["decoder"].update(num_classes=30), "num_classes"),
        (lambda c: c.pop("encoder"), "no 'encoder' section"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    config = flat_config(TINY_QUARTZNET)
    change(config)
    with pytest.raises(NemoImportError, match=message):
        parse_model_config(config)


def test_state_dict_mismatches_are_listed():
    config = flat_config(TINY_QUARTZNET)
    state = random_state_dict(config)
    del state["encoder.encoder.1.mconv.7.running_var"]
    state["encoder.encoder.9.mconv.0.conv.weight"] = np.zeros((1, 1, 1), np.float32)
    state["decoder.decoder_layers.0.bias"] = np.zeros(30, np.float32)
    with pytest.raises(NemoImportError) as error:
        convert(config, state)
    text = str(error.value)
    assert "1 missing: encoder.encoder.1.mconv.7.running_var" in text
    assert "1 unexpected: encoder.encoder.9.mconv.0.conv.weight" in text
    assert "decoder.decoder_layers.0.bias: checkpoint (30,), expected (29,)" in text


def test_num_batches_tracked_is_optional():
    config = flat_config(TINY_QUARTZNET)
    state = {k: v for k, v in random_state_dict(config).items() if "num_batches" not in k}
    assert convert(config, state).model is not None


def test_archive_errors(tmp_path):
    config = flat_config(TINY_QUARTZNET)
    not_tar = tmp_path / "x.nemo"
    not_tar.write_bytes(b"PK\x03\x04 this is a zip, not a tar" * 100)
    with pytest.raises(NemoImportError, match="not a .nemo file"):
        read_nemo_members(not_tar)
    with pytest.raises(FileNotFoundError):
        read_nemo_members(tmp_path / "missing.nemo")

    big = make_nemo_file(tmp_path / "big.nemo", config, weights_bytes=bytes(200_000))
    data = big.read_bytes()
    truncated = tmp_path / "truncated.nemo"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(NemoImportError, match="truncated"):
        read_nemo_members(truncated)

    gz = make_nemo_file(tmp_path / "old.nemo", config, gz=True)
    archive = read_nemo(gz, load_weights=False)
    assert archive.config["encoder"]["feat_in"] == 64  # NeMo 1.0-1.6 gzip .nemo files read too
    gz_truncated = tmp_path / "old_truncated.nemo"
    gz_truncated.write_bytes(gz.read_bytes()[:-200])
    with pytest.raises(NemoImportError, match="truncated|corrupt"):
        read_nemo_members(gz_truncated)

    only_config = tmp_path / "only_config.nemo"
    with tarfile.open(only_config, "w:") as tar:
        payload = yaml.safe_dump(config).encode()
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(NemoImportError, match="no model_weights.ckpt"):
        read_nemo_members(only_config)


def test_missing_torch_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(NemoImportError, match=r"pip install '\.\[nemo\]'"):
        load_state_dict(b"anything")


def test_cli_rejects_bad_files_and_writes_nothing(tmp_path, capsys):
    rnnt = flat_config(TINY_QUARTZNET)
    rnnt["target"] = "nemo.collections.asr.models.EncDecRNNTBPEModel"
    bad = make_nemo_file(tmp_path / "rnnt.nemo", rnnt)
    out = tmp_path / "out"
    assert qn_main(["import-nemo", str(bad), "--out", str(out)]) == 2
    assert "qn import-nemo: error:" in capsys.readouterr().err
    garbage = tmp_path / "garbage.nemo"
    garbage.write_bytes(b"\x00" * 10 + b"junk" * 50)
    assert qn_main(["import-nemo", str(garbage), "--out", str(out)]) == 2
    assert "not a .nemo file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.nemo", "rnnt.nemo"]
    existing = tmp_path / "existing"
    existing.mkdir()
    assert qn_main(["import-nemo", str(bad), "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_nemo_file_round_trip_with_torch(tmp_path):
    """Writes a real torch-pickled .nemo and imports it with the CLI (skipped without torch,
    which is the optional `nemo` extra)."""
    torch = pytest.importorskip("torch")
    from qn_keras.model_dir import load_model_dir

    config = flat_config(TINY_QUARTZNET, nemo_version="1.0.0")
    state = random_state_dict(config, seed=5)
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, buffer)
    nemo = make_nemo_file(tmp_path / "tiny.nemo", config, weights_bytes=buffer.getvalue())
    out = tmp_path / "model"
    assert qn_main(["import-nemo", str(nemo), "--out", str(out), "--no-saved-model"]) == 0
    bundle = load_model_dir(out)
    assert bundle.metadata["era"] == "legacy" and bundle.metadata["nemo_version"] == "1.0.0"
    np.testing.assert_array_equal(bundle.filterbank, state["preprocessor.featurizer.fb"][0])
    reference = convert(config, state)
    for a, b in zip(bundle.model.get_weights(), reference.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
