"""Parity of `qn import-nemo` with NeMo itself (nemo_toolkit 3.0.0, torch 2.13.0 CPU).

`make test-nemo` first runs `make_nemo_reference.py` in `.venv-nemo`: it saves random-weight
QuartzNet 5x5 / 15x5, Jasper-DR and grouped+SE `.nemo` files with NeMo's own features,
log-probabilities, lengths and greedy transcripts for a batch of real clips of different
lengths. Here (main venv, which needs the `nemo` extra for torch) each is imported with
`qn import-nemo --era current` and compared. Not part of `make test` (pyproject ignores
tests/nemo); skipped when the NeMo outputs are absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for parity.py
from parity import worst_relative_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PARITY_DIR = Path(os.environ.get("QN_NEMO_PARITY_DIR", ROOT / "build" / "nemo_parity"))
MANIFEST = PARITY_DIR / "manifest.json"

pytestmark = pytest.mark.skipif(
    not MANIFEST.is_file(), reason=f"no NeMo reference outputs in {PARITY_DIR}: run make test-nemo"
)

# Features: absolute, in units of the normalised features' standard deviation (see
# tests/test_featurizer.py). Log-probs: relative to each frame's scale, max(1, max|log-prob|)
# (tests/parity.py): NeMo's PyTorch features differ from ours by up to ~6e-5 and the network
# carries that through; measured <= 2.4e-4 absolute on 15x5 (2026-11, AMD EPYC AVX2), so 1e-3
# of scale. A wrong BatchNorm epsilon moves a small model by 2e-4 of scale
# (tests/test_parity_tolerances.py) and a full-size one by more; a dropped mask or a missing
# residual by 1e-2 and more.
FEATURE_TOL = 1e-4
LOGPROB_TOL = 1e-3
# Clean TTS clips: float32 FFT rounding in frames spanning >100 dB (see make_nemo_reference.py)
# can move both NeMo's and our features by ~1e-3 from the exact values.
CLEAN_FEATURE_TOL = 5e-3
# A frame may decode differently only where NeMo's best two classes are this close (a tie
# within float32 rounding); at most this share of frames may.
TIE_MARGIN = 2 * LOGPROB_TOL
MAX_TIE_FLIPS = 0.005


def _cases():
    if not MANIFEST.is_file():
        return []
    return [case["name"] for case in json.loads(MANIFEST.read_text())["cases"]]


def qn(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "qn_cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module", params=_cases())
def imported(request, tmp_path_factory):
    """Imports one case with the CLI and runs the result on NeMo's waveforms."""
    import tensorflow as tf

    from qn_keras.model_dir import load_model_dir

    name = request.param
    out = tmp_path_factory.mktemp("import") / name
    result = qn("import-nemo", PARITY_DIR / f"{name}.nemo", "--out", out, "--era", "current")
    assert result.returncode == 0, result.stderr
    ref = dict(np.load(PARITY_DIR / f"{name}.npz"))
    bundle = load_model_dir(out)
    featurizer = bundle.featurizer_layer()
    serving = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    lengths = tf.constant(ref["lengths"], tf.int32)
    ours = {}
    for variant in ("clean", "noisy"):
        waveforms = tf.constant(ref[f"{variant}_waveforms"])
        features, feature_lengths = featurizer(waveforms, lengths)
        # End to end through the folder's SavedModel (front end, network, greedy decoding) ...
        served = serving(waveform=waveforms, lengths=lengths)
        # ... and the folder's Keras model alone on NeMo's own features.
        on_nemo_features, _ = bundle.model(
            [ref[f"{variant}_features"], ref[f"{variant}_feature_lengths"].astype(np.int32)],
            training=False,
        )
        ours[variant] = {
            "features": features.numpy(),
            "feature_lengths": feature_lengths.numpy(),
            "logprobs": served["logprobs"].numpy(),
            "logprob_lengths": served["logprob_lengths"].numpy(),
            "transcripts": [t.decode("utf-8") for t in served["transcripts"].numpy()],
            "logprobs_on_nemo_features": on_nemo_features.numpy(),
        }
    measured = {
        variant: {
            "features": float(np.abs(ours[variant]["features"] - ref[f"{variant}_features"]).max()),
            "logprobs": _valid_max_diff(
                ours[variant]["logprobs"],
                ref[f"{variant}_logprobs"],
                ref[f"{variant}_logprob_lengths"],
            ),
            "logprobs_on_nemo_features": _valid_max_diff(
                ours[variant]["logprobs_on_nemo_features"],
                ref[f"{variant}_logprobs"],
                ref[f"{variant}_logprob_lengths"],
            ),
            "flipped_frames": _flips(ours[variant], ref, variant)[0],
        }
        for variant in ours
    }
    _record(name, measured)
    return {"name": name, "ref": ref, "ours": ours, "bundle": bundle, "out": out}


def _record(name, measured):
    """Keeps the measured differences in PARITY_DIR/measured.json (for BENCHMARKS/reports)."""
    path = PARITY_DIR / "measured.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = measured
    path.write_text(json.dumps(data, indent=1))


def _flips(ours, ref, variant):
    """(frames whose best class differs from NeMo's, the NeMo margins at those frames)."""
    nemo = ref[f"{variant}_logprobs"]
    flipped, margins = 0, []
    for i, n in enumerate(ref[f"{variant}_logprob_lengths"]):
        top2 = np.sort(nemo[i, :n], axis=-1)[:, -2:]
        differ = ours["logprobs"][i, :n].argmax(-1) != nemo[i, :n].argmax(-1)
        flipped += int(differ.sum())
        margins += (top2[differ, 1] - top2[differ, 0]).tolist()
    return flipped, margins


def nemo_postprocess(text, labels):
    """NeMo >= 2.x's text step: one space before punctuation in the vocabulary is deleted."""
    punctuation = "".join(c for c in labels if unicodedata.category(c).startswith("P"))
    return re.sub(r"(\s)([" + re.escape(punctuation) + "])", r"\2", text) if punctuation else text


def _valid_max_diff(a, b, lengths):
    """Largest difference over valid frames, relative to each frame's scale (parity.py)."""
    return max(worst_relative_error(a[i, :n], b[i, :n]) for i, n in enumerate(lengths))


@pytest.mark.parametrize("variant", ["clean", "noisy"])
def test_lengths_match_nemo(imported, variant):
    ref, ours = imported["ref"], imported["ours"][variant]
    np.testing.assert_array_equal(ours["feature_lengths"], ref[f"{variant}_feature_lengths"])
    np.testing.assert_array_equal(ours["logprob_lengths"], ref[f"{variant}_logprob_lengths"])
    assert ours["features"].shape == ref[f"{variant}_features"].shape
    assert ours["logprobs"].shape == ref[f"{variant}_logprobs"].shape


def test_features_match_nemo(imported):
    ref, ours = imported["ref"], imported["ours"]
    noisy = float(np.abs(ours["noisy"]["features"] - ref["noisy_features"]).max())
    clean = float(np.abs(ours["clean"]["features"] - ref["clean_features"]).max())
    print(f"{imported['name']}: features max |diff| noisy {noisy:.2e}, clean {clean:.2e}")
    assert noisy <= FEATURE_TOL
    assert clean <= CLEAN_FEATURE_TOL


def test_logprobs_match_nemo(imported):
    ref, ours = imported["ref"], imported["ours"]["noisy"]
    lengths = ref["noisy_logprob_lengths"]
    diff = _valid_max_diff(ours["logprobs"], ref["noisy_logprobs"], lengths)
    print(f"{imported['name']}: log-probs max |diff| {diff:.2e} of frame scale")
    assert diff <= LOGPROB_TOL


@pytest.mark.parametrize("variant", ["clean", "noisy"])
def test_weights_map_exactly(imported, variant):
    """Fed NeMo's own features, the converted network reproduces NeMo's log-probs: isolates the
    weight mapping from front-end rounding."""
    ref, ours = imported["ref"], imported["ours"][variant]
    lengths = ref[f"{variant}_logprob_lengths"]
    diff = _valid_max_diff(ours["logprobs_on_nemo_features"], ref[f"{variant}_logprobs"], lengths)
    print(
        f"{imported['name']} ({variant}): log-probs on NeMo's features max |diff| {diff:.2e} of frame scale"
    )
    assert diff <= LOGPROB_TOL


@pytest.mark.parametrize("variant", ["clean", "noisy"])
def test_transcripts_match_nemo(imported, variant):
    """Identical greedy transcripts, unless a frame is a tie within float32 rounding.

    qn-keras decodes with the plain CTC collapse (as NeMo 1.x did, and as NeMo's released WER
    figures were computed); NeMo 3.0 additionally deletes a space before an apostrophe. Both
    are compared: ours with NeMo's collapse, and ours post-processed with NeMo's text."""
    ref, ours = imported["ref"], imported["ours"][variant]
    flipped, margins = _flips(ours, ref, variant)
    frames = int(ref[f"{variant}_logprob_lengths"].sum())
    assert all(m <= TIE_MARGIN for m in margins), margins
    assert flipped <= MAX_TIE_FLIPS * frames
    if flipped == 0:
        labels = imported["bundle"].tokenizer.labels
        assert ours["transcripts"] == [str(t) for t in ref[f"{variant}_collapsed"]]
        nemo_text = [nemo_postprocess(t, labels) for t in ours["transcripts"]]
        assert nemo_text == [str(t) for t in ref[f"{variant}_transcripts"]]


def test_import_records_provenance(imported):
    bundle = imported["bundle"]
    manifest = json.loads(MANIFEST.read_text())
    case = next(c for c in manifest["cases"] if c["name"] == imported["name"])
    meta = bundle.metadata
    assert meta["era"] == "current" and bundle.featurizer.era == "current"
    assert meta["nemo_version"] == manifest["nemo_version"]
    from qn_keras.summary import trainable_parameters

    assert trainable_parameters(bundle.model) == case["params"]
    assert bundle.filterbank.shape == (64, 257) and bundle.window.shape == (320,)
