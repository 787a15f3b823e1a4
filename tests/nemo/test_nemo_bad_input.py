"""`qn import-nemo` on damaged versions of a real NeMo-saved `.nemo` (from make_nemo_reference.py):
truncated, weights with missing/extra/reshaped tensors, a transducer config. Each is a one-line
error naming the problem, exit status 2, and no output folder (nor a temporary one) is left."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml

from qn_cli.main import main as qn_main

ROOT = Path(__file__).resolve().parents[2]
PARITY_DIR = Path(os.environ.get("QN_NEMO_PARITY_DIR", ROOT / "build" / "nemo_parity"))
MANIFEST = PARITY_DIR / "manifest.json"

pytestmark = pytest.mark.skipif(
    not MANIFEST.is_file(), reason=f"no NeMo reference outputs in {PARITY_DIR}: run make test-nemo"
)


@pytest.fixture(scope="module")
def smallest():
    cases = json.loads(MANIFEST.read_text())["cases"]
    return PARITY_DIR / min(cases, key=lambda c: c["params"])["nemo"]


def members(path):
    with tarfile.open(path, "r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def repack(path, files):
    with tarfile.open(path, "w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def with_state_dict(source, target, change):
    torch = pytest.importorskip("torch")
    files = members(source)
    state = torch.load(io.BytesIO(files["./model_weights.ckpt"]), weights_only=True)
    change(state, torch)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files["./model_weights.ckpt"] = buffer.getvalue()
    return repack(target, files)


def import_fails(tmp_path, nemo_file, capsys, message):
    out = tmp_path / "model"
    before = set(tmp_path.iterdir())
    assert qn_main(["import-nemo", str(nemo_file), "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("qn import-nemo: error:") and message in last, last
    assert set(tmp_path.iterdir()) == before  # no output, no temporary folder


def test_truncated_file(tmp_path, smallest, capsys):
    data = smallest.read_bytes()
    with tarfile.open(smallest) as tar:
        last = max(tar.getmembers(), key=lambda m: m.offset_data)
    # inside the archive, inside its last member's data, inside its last member's header
    for cut in (len(data) // 2, last.offset_data + last.size - 100, last.offset + 100):
        path = tmp_path / f"cut{cut}.nemo"
        path.write_bytes(data[:cut])
        import_fails(tmp_path, path, capsys, "truncated")


def test_missing_tensor(tmp_path, smallest, capsys):
    def drop(state, torch):
        del state["encoder.encoder.1.mconv.8.running_var"]

    path = with_state_dict(smallest, tmp_path / "missing.nemo", drop)
    import_fails(tmp_path, path, capsys, "1 missing: encoder.encoder.1.mconv.8.running_var")


def test_extra_tensor(tmp_path, smallest, capsys):
    def add(state, torch):
        state["encoder.encoder.1.adapter.weight"] = torch.zeros(3)

    path = with_state_dict(smallest, tmp_path / "extra.nemo", add)
    import_fails(tmp_path, path, capsys, "1 unexpected: encoder.encoder.1.adapter.weight")


def test_wrong_shape(tmp_path, smallest, capsys):
    def reshape(state, torch):
        state["decoder.decoder_layers.0.bias"] = torch.zeros(30)

    path = with_state_dict(smallest, tmp_path / "shape.nemo", reshape)
    import_fails(tmp_path, path, capsys, "decoder.decoder_layers.0.bias: checkpoint (30,)")


def test_transducer_config(tmp_path, smallest, capsys):
    files = members(smallest)
    config = yaml.safe_load(files["./model_config.yaml"])
    config["target"] = "nemo.collections.asr.models.rnnt_models.EncDecRNNTModel"
    config["joint"] = {"_target_": "nemo.collections.asr.modules.RNNTJoint"}
    files["./model_config.yaml"] = yaml.safe_dump(config).encode()
    path = repack(tmp_path / "rnnt.nemo", files)
    import_fails(tmp_path, path, capsys, "RNN-T")


def test_default_era_of_a_nemo_3_checkpoint_is_current(smallest):
    from qn_keras.nemo import import_nemo

    bundle = import_nemo(smallest)
    assert bundle.metadata["era"] == "current"
    assert "3.0.0" in bundle.metadata["era_source"]
