"""Readers for the speech corpora the project accepts, producing one :class:`Utterance` each.

Three layouts are understood:

- NeMo JSON-lines manifests: one object per line with ``audio_filepath`` (absolute, or relative
  to the manifest's folder), ``text``, optional ``duration`` and ``offset``.
- LibriSpeech-style folders: ``*.trans.txt`` files (``<utt-id> <TRANSCRIPT>`` per line) beside
  the ``<utt-id>.flac`` files they describe.
- CSV/TSV files with a header row naming a path column and a transcript column.

Readers never raise on a bad line: they yield a :class:`ManifestFailure` in its place, so a
batch job can list it in ``failures.jsonl`` and carry on. :func:`load_utterances` is the strict
form for command-line tools, raising ``ValueError("file:line: ...")`` on the first bad line.

Parsing works on an iterable of lines plus the manifest's location, so callers that open files
through another file system (Beam's ``FileSystems`` on ``gs://``) reuse the same code.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path

from qn_keras.errors import UserInputError

# File name endings read as manifests (NeMo JSON lines, CSV/TSV).
MANIFEST_EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv")

BAD_MANIFEST_LINE = "bad_manifest_line"

PATH_COLUMNS = ("audio_filepath", "path", "audio", "file", "filename", "wav", "audio_path")
TEXT_COLUMNS = ("text", "transcript", "sentence", "transcription", "label")


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One transcribed stretch of audio.

    Attributes:
        utt_id: identifier, unique within a corpus (the audio file's stem, with the offset in
            milliseconds appended when the utterance is a segment of a longer file).
        audio_filepath: absolute path or URL of the audio file.
        text: transcript as written in the manifest (not normalized).
        duration: seconds of audio the manifest declares, or None.
        offset: seconds to skip at the start of the file.
        source: ``"<manifest path>:<line number>"`` the utterance came from.
        segment: True when the utterance is ``duration`` seconds from ``offset`` of a longer
            file (the manifest gave an ``offset``); otherwise the whole file is read, so a
            manifest duration rounded to milliseconds never clips the last samples.
    """

    utt_id: str
    audio_filepath: str
    text: str
    duration: float | None = None
    offset: float = 0.0
    source: str = ""
    segment: bool = False

    @property
    def read_duration(self) -> float | None:
        """Seconds to decode from ``offset`` on (None: to the end of the file)."""
        return self.duration if self.segment else None


@dataclasses.dataclass(frozen=True)
class Failure:
    """An utterance (or manifest line) that could not be used, and why: the one failure type
    of manifest readers, the feature job's ``failures.jsonl`` and the trainer's cache."""

    source: str | None  # "<manifest>:<line>", or the manifest when it cannot be read at all
    message: str
    reason: str = BAD_MANIFEST_LINE
    utt_id: str | None = None
    audio_filepath: str | None = None

    @classmethod
    def of(cls, utt: Utterance | None, reason: str, message: str, utt_id=None, source=None):
        """A failure of ``utt`` (ids and paths taken from it unless given)."""
        return cls(
            source=source if source is not None else (utt.source if utt else None),
            message=message,
            reason=reason,
            utt_id=utt_id if utt_id is not None else (utt.utt_id if utt else None),
            audio_filepath=utt.audio_filepath if utt else None,
        )

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "utt_id": self.utt_id,
            "audio_filepath": self.audio_filepath,
            "reason": self.reason,
            "message": self.message,
        }


ManifestFailure = Failure  # the readers' name for it


def _is_url(path: str) -> bool:
    return "://" in path


def resolve_audio_path(audio_path: str, manifest_path: str) -> str:
    """An audio path as written in a manifest, made absolute against the manifest's folder."""
    audio_path = os.path.expanduser(audio_path)
    if _is_url(audio_path) or os.path.isabs(audio_path):
        return audio_path
    if _is_url(manifest_path):
        return posixpath.join(posixpath.dirname(manifest_path), audio_path)
    return os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(manifest_path)), audio_path)
    )


def make_utt_id(audio_path: str, offset: float = 0.0) -> str:
    stem = posixpath.basename(audio_path.replace("\\", "/"))
    stem = stem.split(".", 1)[0] if "." in stem else stem
    if offset:
        stem = f"{stem}_{int(round(offset * 1000)):08d}"
    return stem


def nemo_utt_id(record: dict, audio: str, offset: float) -> str:
    """A NeMo manifest line's utterance id: its own ``utt_id``/``id``, else the file's stem."""
    return str(record.get("utt_id") or record.get("id") or make_utt_id(audio, offset))


def _optional_seconds(record: dict, key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UserInputError(f"{key!r} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise UserInputError(f"{key!r} must be a finite, non-negative number, got {value!r}")
    return seconds


def parse_nemo_lines(
    lines: Iterable[str], manifest_path: str
) -> Iterator[Utterance | ManifestFailure]:
    """Utterances of a NeMo JSON-lines manifest, a failure record for each bad line."""
    manifest_path = str(manifest_path)
    for number, line in enumerate(lines, start=1):
        source = f"{manifest_path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise UserInputError(f"expected a JSON object, got {type(record).__name__}")
            audio = record.get("audio_filepath")
            if not isinstance(audio, str) or not audio:
                raise UserInputError("missing or empty 'audio_filepath'")
            text = record.get("text", "")
            if not isinstance(text, str):
                raise UserInputError(f"'text' must be a string, got {text!r}")
            offset = _optional_seconds(record, "offset") or 0.0
            duration = _optional_seconds(record, "duration")
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            yield ManifestFailure(source, f"Bad manifest line {source}: {e}")
            continue
        utt_id = nemo_utt_id(record, audio, offset)
        yield Utterance(
            utt_id=utt_id,
            audio_filepath=resolve_audio_path(audio, manifest_path),
            text=text,
            duration=duration,
            offset=offset,
            source=source,
            segment="offset" in record and duration is not None,
        )


def parse_librispeech_lines(
    lines: Iterable[str], transcript_path: str
) -> Iterator[Utterance | ManifestFailure]:
    """Utterances of one LibriSpeech ``*.trans.txt`` file; audio is ``<id>.flac`` beside it."""
    transcript_path = str(transcript_path)
    for number, line in enumerate(lines, start=1):
        source = f"{transcript_path}:{number}"
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) != 2 or not parts[0]:
            yield ManifestFailure(
                source, f"Bad transcript line {source}: expected '<utterance id> <transcript>'"
            )
            continue
        utt_id, text = parts
        yield Utterance(
            utt_id=utt_id,
            audio_filepath=resolve_audio_path(f"{utt_id}.flac", transcript_path),
            text=text,
            source=source,
        )


def _pick_column(header: list[str], wanted: str | None, candidates: tuple, what: str) -> int:
    lowered = [h.strip().lower() for h in header]
    if wanted is not None:
        if wanted.lower() not in lowered:
            raise UserInputError(f"no {what} column {wanted!r}; the header has {header}")
        return lowered.index(wanted.lower())
    for name in candidates:
        if name in lowered:
            return lowered.index(name)
    raise UserInputError(f"no {what} column (one of {list(candidates)}); the header has {header}")


def parse_csv_lines(
    lines: Iterable[str],
    manifest_path: str,
    delimiter: str | None = None,
    path_column: str | None = None,
    text_column: str | None = None,
) -> Iterator[Utterance | ManifestFailure]:
    """Utterances of a CSV/TSV file whose header names a path and a transcript column.

    The delimiter defaults to a tab for ``.tsv`` files and a comma otherwise. A header that
    names neither column is one failure for line 1 (nothing else in the file can be read).
    """
    manifest_path = str(manifest_path)
    if delimiter is None:
        delimiter = "\t" if manifest_path.lower().endswith(".tsv") else ","
    rows = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(rows)
    except StopIteration:
        return
    try:
        path_index = _pick_column(header, path_column, PATH_COLUMNS, "audio path")
        text_index = _pick_column(header, text_column, TEXT_COLUMNS, "transcript")
    except ValueError as e:
        yield ManifestFailure(f"{manifest_path}:1", f"Bad header {manifest_path}:1: {e}")
        return
    duration_index = header.index("duration") if "duration" in header else None
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            yield ManifestFailure(f"{manifest_path}:{rows.line_num}", f"Bad CSV line: {e}")
            continue
        source = f"{manifest_path}:{rows.line_num}"
        if not row or all(not cell.strip() for cell in row):
            continue
        needed = max(path_index, text_index)
        if len(row) <= needed or not row[path_index].strip():
            yield ManifestFailure(
                source, f"Bad manifest line {source}: expected {len(header)} columns, got {row}"
            )
            continue
        audio = row[path_index].strip()
        duration = None
        if duration_index is not None and len(row) > duration_index and row[duration_index]:
            try:
                duration = float(row[duration_index])
            except ValueError:
                yield ManifestFailure(
                    source, f"Bad manifest line {source}: duration {row[duration_index]!r}"
                )
                continue
        yield Utterance(
            utt_id=make_utt_id(audio),
            audio_filepath=resolve_audio_path(audio, manifest_path),
            text=row[text_index],
            duration=duration,
            source=source,
        )


def manifest_kind(path: str) -> str:
    """``"librispeech"`` for a folder, ``"csv"`` for .csv/.tsv, ``"nemo"`` otherwise."""
    if os.path.isdir(path):
        return "librispeech"
    if str(path).lower().endswith((".csv", ".tsv")):
        return "csv"
    return "nemo"


def parse_lines(
    lines: Iterable[str], path: str, kind: str | None = None
) -> Iterator[Utterance | ManifestFailure]:
    """Dispatches to the parser for ``kind`` (a :func:`manifest_kind` result)."""
    kind = kind or manifest_kind(path)
    if kind == "csv":
        return parse_csv_lines(lines, path)
    if kind == "librispeech":
        return parse_librispeech_lines(lines, path)
    return parse_nemo_lines(lines, path)


def _open_lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def librispeech_transcripts(root: str) -> list[str]:
    """Sorted ``*.trans.txt`` files under ``root``."""
    return sorted(str(p) for p in Path(root).rglob("*.trans.txt"))


def read_utterances(path) -> Iterator[Utterance | ManifestFailure]:
    """Every utterance of a manifest file or LibriSpeech-style folder, in file order, with a
    :class:`ManifestFailure` in place of each line that cannot be read."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Manifest not found: {path}")
    kind = manifest_kind(path)
    if kind == "librispeech":
        transcripts = librispeech_transcripts(path)
        if not transcripts:
            raise FileNotFoundError(f"No *.trans.txt files under {path}")
        for transcript in transcripts:
            yield from parse_librispeech_lines(_open_lines(transcript), transcript)
        return
    if kind == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            yield from parse_csv_lines(f, path)
        return
    yield from parse_nemo_lines(_open_lines(path), path)


def load_utterances(paths) -> list[Utterance]:
    """Strict reader for command-line tools: all utterances of one or more manifests, raising
    ``ValueError`` naming ``file:line`` on the first line that cannot be read."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    utterances = []
    for path in paths:
        for item in read_utterances(path):
            if isinstance(item, ManifestFailure):
                raise UserInputError(item.message)
            utterances.append(item)
    return utterances


def utterance_groups(path, field: str) -> dict[str, str]:
    """``{utt_id: group}`` for a per-group breakdown (``qn evaluate --group-by``).

    NeMo JSON manifests group by any field of their lines (``source``, ``speaker``, ...;
    lines without it fall in ``"(none)"``); LibriSpeech folders by ``speaker``, the id's first
    part. Other manifests, and other fields of LibriSpeech folders, raise ``UserInputError``.
    """
    path = str(path)
    kind = manifest_kind(path)
    groups = {}
    if kind == "librispeech":
        if not librispeech_transcripts(path):
            raise UserInputError(
                f"{path} has no *.trans.txt files (a `qn features` folder keeps no speaker or "
                "voice fields): group the manifest it was made from"
            )
        if field != "speaker":
            raise UserInputError(
                f"A LibriSpeech folder can only be grouped by 'speaker', not {field!r}"
            )
        for item in read_utterances(path):
            if isinstance(item, Utterance):
                groups[item.utt_id] = item.utt_id.split("-", 1)[0]
        return groups
    if kind != "nemo":
        raise UserInputError(
            f"--group-by needs a NeMo JSON-lines manifest or a LibriSpeech folder, not {path}"
        )
    lines = list(_open_lines(path))
    # The reader's own parse decides which lines are utterances and their ids; it yields one
    # item (utterance or failure) per non-empty line, so the two lists pair up.
    filled = [line for line in lines if line.strip()]
    for line, item in zip(filled, parse_nemo_lines(lines, path), strict=True):
        if not isinstance(item, Utterance):
            continue
        value = json.loads(line).get(field)
        value = "(none)" if value is None else str(value)
        if groups.setdefault(item.utt_id, value) != value:
            raise UserInputError(
                f"{item.source}: utterance id {item.utt_id!r} also names an earlier line with "
                f"another {field} ({groups[item.utt_id]!r} vs {value!r}); give the lines "
                "unique 'utt_id' fields (ids come from file names, which repeat across folders)"
            )
    return groups
