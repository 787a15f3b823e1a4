"""What `qn transcribe --stream` and `qn client --stream` share: where the audio comes from (a
file played in real time or as fast as possible, or raw 16-bit PCM on standard input), the
live display of final and partial text, and the options."""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Iterator

import numpy as np

from qn_keras.errors import UserInputError

BLOCK_SECONDS = 0.1  # audio handed to the recognizer at a time (a microphone's period)


def add_arguments(parser: argparse.ArgumentParser, model_side: bool = True) -> None:
    group = parser.add_argument_group(
        "streaming",
        "--stream FILE plays FILE in real time (--no-realtime: as fast as possible); "
        "--stream - reads raw 16-bit mono PCM at the model's rate from standard input "
        "(arecord -f S16_LE -r 16000 -c 1 -t raw | qn transcribe --model M --stream -)",
    )
    group.add_argument("--stream", metavar="FILE", help="stream one file, or - for stdin")
    group.add_argument(
        "--no-realtime", action="store_true", help="feed the file as fast as it is transcribed"
    )
    group.add_argument(
        "--stream-chunk",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="audio per model call (default 1)",
    )
    if model_side:
        group.add_argument(
            "--stream-mode",
            choices=("auto", "buffered", "stateful"),
            default="auto",
            help="stateful for models trained with a lookahead (auto), else buffered",
        )
        group.add_argument(
            "--left-context", type=float, default=2.0, metavar="SECONDS", help="buffered (2)"
        )
        group.add_argument(
            "--right-context", type=float, default=0.5, metavar="SECONDS", help="buffered (0.5)"
        )
        group.add_argument(
            "--normalization",
            choices=("running", "pooled", "adaptive", "fixed"),
            help="feature normalization (default: running buffered, adaptive stateful)",
        )


def read_pcm_header(stream, sample_rate: int) -> bytes:
    """Consumes a WAV header if standard input starts with one: accepted when it says 16-bit
    mono PCM at ``sample_rate`` (arecord writes one unless told ``-t raw``), a UserInputError
    naming what to send otherwise. Returns bytes read past the header (or the first bytes)."""
    head = stream.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return head
    while True:
        chunk = stream.read(8)
        if len(chunk) < 8:
            raise UserInputError("Standard input ends inside its WAV header.")
        kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if kind == b"data":
            return b""
        body = stream.read(size + (size & 1))
        if kind == b"fmt ":
            fmt, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if (fmt, channels, rate, bits) != (1, 1, sample_rate, 16):
                raise UserInputError(
                    f"Standard input is a WAV stream of {bits}-bit, {channels}-channel audio "
                    f"at {rate} Hz (format {fmt}); --stream - needs 16-bit mono PCM at "
                    f"{sample_rate} Hz: arecord -f S16_LE -r {sample_rate} -c 1 -t raw"
                )


def stdin_blocks(sample_rate: int, stream=None) -> Iterator[np.ndarray]:
    """Blocks of float32 samples from raw little-endian 16-bit mono PCM on standard input."""
    stream = stream or sys.stdin.buffer
    pending = read_pcm_header(stream, sample_rate)
    block_bytes = 2 * int(BLOCK_SECONDS * sample_rate)
    while True:
        data = stream.read(block_bytes)  # blocks until that much arrives, or end of input
        pending += data or b""
        whole = len(pending) - len(pending) % 2
        if whole:
            yield np.frombuffer(pending[:whole], "<i2").astype(np.float32) / 32768.0
            pending = pending[whole:]
        if len(data or b"") < block_bytes:
            if pending:
                raise UserInputError("Standard input ended in the middle of a 16-bit sample.")
            return


def file_blocks(path, sample_rate: int, realtime: bool) -> Iterator[np.ndarray]:
    """The file's samples (decoded and resampled), in blocks, at the pace of real time."""
    from qn_keras.audio import decode_audio

    waveform = decode_audio(path, sample_rate)
    block = int(BLOCK_SECONDS * sample_rate)
    start = time.monotonic()
    for first in range(0, len(waveform), block):
        if realtime:
            delay = start + first / sample_rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield waveform[first : first + block]


def blocks(args, sample_rate: int) -> Iterator[np.ndarray]:
    if args.stream == "-":
        return stdin_blocks(sample_rate)
    return file_blocks(args.stream, sample_rate, realtime=not args.no_realtime)


class LiveDisplay:
    """Final text with the partial guess after it, on standard error: one line rewritten in
    place on a terminal, a line per change of the final text otherwise."""

    def __init__(self, out=None):
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.shown = ""
        self.width = 0

    def update(self, text: str, partial: str, seconds: float) -> None:
        if self.tty:
            line = f"[{seconds:6.1f}s] {text}" + (f" \x1b[2m{partial}\x1b[0m" if partial else "")
            tail = line[-200:]
            self.out.write("\r" + tail + " " * max(0, self.width - len(tail)))
            self.width = len(tail)
            self.out.flush()
        elif text != self.shown:
            print(f"[{seconds:6.1f}s] {text}", file=self.out, flush=True)
        self.shown = text

    def close(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()


def run_stream(recognizer, audio_blocks, sample_rate: int, display: LiveDisplay) -> dict:
    """Feeds the blocks to a StreamingRecognizer-like object; returns the transcript and the
    measured compute per block."""
    seconds = 0.0
    compute = []
    try:
        for block in audio_blocks:
            started = time.perf_counter()
            update = recognizer.feed(block)
            compute.append(time.perf_counter() - started)
            seconds += len(block) / sample_rate
            display.update(update.text, update.partial, seconds)
        text = recognizer.finish()
        display.update(text, "", seconds)
    finally:
        display.close()
    return {"text": text, "seconds": seconds, "compute_seconds": float(np.sum(compute))}
