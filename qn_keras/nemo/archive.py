"""Reads a ``.nemo`` file: a tar (uncompressed since NeMo 1.7, gzip before) holding
``./model_config.yaml`` and ``./model_weights.ckpt`` (a ``torch.save``-d state dict).

PyTorch is needed only to unpickle the weights, so it is imported lazily here and nowhere
else; it is the optional ``nemo`` extra (``pip install .[nemo]``, which pins a CPU-only
``torch``).
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
import zlib
from pathlib import Path

import yaml

from qn_keras.nemo.config import NemoImportError

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
TORCH_HINT = (
    "reading NeMo weights needs PyTorch: pip install '.[nemo]' in the qn-keras checkout "
    "(installs the pinned CPU build torch==2.13.0)"
)


@dataclasses.dataclass
class NemoArchive:
    """The parsed contents of a ``.nemo`` file."""

    path: Path
    config: dict
    state_dict: dict  # key -> np.ndarray (float32, PyTorch layout); {} when not loaded
    members: tuple


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def read_nemo_members(path) -> dict:
    """``{member name without './': bytes}`` for the config and weights members.

    NemoImportError for a missing file, a file that is not a (gzip) tar, a truncated tar, or
    one without the two members.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NeMo checkpoint not found: {path}")
    wanted = {CONFIG_MEMBER, WEIGHTS_MEMBER}
    found: dict = {}
    names = []
    try:
        # "r:*" reads both the uncompressed (NeMo >= 1.7) and the gzip (1.0-1.6) variants.
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = _member_name(member.name)
                names.append(name)
                if name in wanted and member.isfile():
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise NemoImportError(
                            f"{path} is truncated: {name} has {len(data)} of {member.size} bytes."
                        )
                    found[name] = data
    except tarfile.ReadError as e:
        if not names:
            raise NemoImportError(
                f"{path} is not a .nemo file (not a tar or tar.gz archive: {e})."
            ) from e
        raise NemoImportError(f"{path} is truncated or corrupt ({e}).") from e
    except (EOFError, zlib.error, tarfile.TarError, OSError) as e:
        raise NemoImportError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}).") from e
    missing = sorted(wanted - set(found))
    if missing:
        raise NemoImportError(
            f"{path} is not a complete .nemo file: no {', '.join(missing)} "
            f"(members: {', '.join(names[:10]) or 'none'})."
        )
    return found


def parse_config_yaml(data: bytes) -> dict:
    try:
        config = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise NemoImportError(f"model_config.yaml is not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise NemoImportError("model_config.yaml is not a mapping.")
    return config


def load_state_dict(data: bytes) -> dict:
    """Unpickles ``model_weights.ckpt`` with ``torch.load(weights_only=True)`` (no arbitrary
    code runs) and returns float32 NumPy arrays in PyTorch layout."""
    try:
        import torch
    except ImportError as e:
        raise NemoImportError(TORCH_HINT) from e
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, runtime and zip errors alike
        raise NemoImportError(
            f"model_weights.ckpt could not be read with torch.load(weights_only=True): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a Lightning checkpoint renamed to .ckpt
    if not isinstance(state, dict):
        raise NemoImportError(
            f"model_weights.ckpt holds a {type(state).__name__}, not a state dict."
        )
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise NemoImportError(f"model_weights.ckpt entry {key!r} is not a tensor.")
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # half / bfloat16 checkpoints
        out[str(key)] = value.numpy()
    return out


def read_nemo(path, load_weights: bool = True) -> NemoArchive:
    """Reads a ``.nemo`` file; with ``load_weights=False`` only the config (no torch needed)."""
    members = read_nemo_members(path)
    config = parse_config_yaml(members[CONFIG_MEMBER])
    state_dict = load_state_dict(members[WEIGHTS_MEMBER]) if load_weights else {}
    return NemoArchive(Path(path), config, state_dict, tuple(sorted(members)))
