"""Files that are whole or absent: every output is written under a temporary name beside its
target and renamed into place (atomic on POSIX), so a reader, or the next run after a kill,
never sees half a file. One implementation for the whole project.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np


def _temporary(path: Path) -> Path:
    # Hidden, unique per writer (two processes never share one), same folder (same device).
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write ``path``'s content to; on success it replaces ``path``,
    on any error it is removed. For writers that want a file name (TFRecordWriter, savez,
    savefig)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_default(value):
    """``json.dumps(default=...)`` for NumPy scalars and arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path, data, indent: int | None = 1) -> Path:
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=json_default)
    return write_text(path, text + ("\n" if indent is not None else ""))


def write_json_lines(path, rows) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False, default=json_default) + "\n" for row in rows)
    return write_text(path, text)


@contextlib.contextmanager
def atomic_directory(path, *, replace: bool = False):
    """Yields a temporary folder beside ``path`` to fill; on success it becomes ``path``.

    Without ``replace`` an existing ``path`` is an error (``os.rename`` refuses a non-empty
    target, so of two concurrent writers only one wins). With it, an existing ``path`` is
    moved aside first and deleted once the new one is in place. On any error the temporary
    folder is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
