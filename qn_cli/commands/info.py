"""`qn info`: versions of the stack and the devices TensorFlow finds."""

from __future__ import annotations

import importlib.metadata
import json
import platform

PACKAGES = (
    "qn-keras",
    "tensorflow",
    "keras",
    "tensorflow-addons",
    "tensorflow-io",
    "tensorflow-model-optimization",
    "keras-tuner",
    "apache-beam",
    "numpy",
)


def register(subparsers):
    parser = subparsers.add_parser("info", help="print versions and devices")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def tf_keras_version() -> str:
    """Version of the Keras package that ``tf.keras`` resolves to (``keras`` for TF 2.15's own
    Keras 2, ``tf_keras`` if that second Keras 2 were installed and chosen); TF 2.15's
    ``tf.keras`` has no ``__version__`` of its own."""
    import importlib

    import tensorflow as tf

    package = tf.keras.layers.Layer.__module__.split(".")[0]
    return f"{importlib.import_module(package).__version__} ({package})"


def run(args) -> int:
    import tensorflow as tf

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = [{"name": d.name, "type": d.device_type} for d in tf.config.list_physical_devices()]
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "tf_keras_version": tf_keras_version(),
        "devices": devices,
        "built_with_cuda": tf.test.is_built_with_cuda(),
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"python {info['python']} on {info['platform']}")
    for name, version in versions.items():
        print(f"  {name:32s} {version or 'not installed'}")
    print(f"  tf.keras is Keras {info['tf_keras_version']}")
    print("devices: " + ", ".join(f"{d['name']} ({d['type']})" for d in devices))
    return 0
