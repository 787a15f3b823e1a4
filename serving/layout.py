"""The layout of a TF Serving export folder, for everything that reads one (the recognizer,
the local server, the TFLite runner) without importing the exporter.

    BASE/NAME/VERSION/saved_model.pb, variables/
    BASE/NAME/VERSION/assets.extra/tf_serving_warmup_requests, qn_export.json
    BASE/NAME/VERSION/tflite/<mode>.tflite
"""

from __future__ import annotations

import json
from pathlib import Path

WARMUP_FILE = "tf_serving_warmup_requests"
# Not qn_model.json, which is the model folder's own file (qn_keras.model_dir) with other keys;
# exports written before the rename are still read (read_export_metadata).
METADATA_FILE = "qn_export.json"
_OLD_METADATA_FILE = "qn_model.json"
TFLITE_DIR = "tflite"


def existing_versions(model_base) -> list[int]:
    base = Path(model_base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version_dir(model_base) -> Path:
    """The newest integer version folder holding a saved_model.pb, as TF Serving would pick."""
    base = Path(model_base)
    versions = [v for v in existing_versions(base) if (base / str(v) / "saved_model.pb").is_file()]
    if not versions:
        raise FileNotFoundError(
            f"No version folder with a saved_model.pb under {base}; export one with "
            "`qn export --model DIR --out BASE --name NAME`."
        )
    return base / str(versions[-1])


def read_export_metadata(version_dir) -> dict | None:
    """``assets.extra/qn_export.json`` of a version folder (or the older name), or None."""
    for name in (METADATA_FILE, _OLD_METADATA_FILE):
        path = Path(version_dir) / "assets.extra" / name
        if path.is_file():
            return json.loads(path.read_text())
    return None
