"""Batch transcription of files, folders and manifests, with long audio in bounded memory.

Short files are decoded with :func:`qn_keras.audio.decode_audio` (any soundfile format, any
rate), sorted by duration and run in padded batches (padding does not change the model's
outputs). Files longer than ``max_whole_seconds`` are streamed in overlapping chunks:

1. Pass one streams the file in blocks and accumulates each mel band's mean and variance
   over the whole file: the featurizer normalises per utterance, and the utterance is the
   whole file.
2. Pass two cuts the output frames into chunks of ``chunk_seconds``; each chunk is run with
   ``context_seconds`` of audio on either side, normalised with the whole-file statistics, and
   only its own frames are kept (stitching at the 20 ms output-frame level).

Reading goes through ``soundfile`` block reads with seeks, and resampling reproduces
``scipy.signal.resample_poly`` over the whole file exactly, by resampling each piece with
enough native-rate margin on the polyphase grid. Memory is proportional to the chunk length,
not the file's; the results equal whole-file transcription when the context covers the
model's receptive field (:func:`receptive_field_seconds`), and in practice long before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import tensorflow as tf

from qn_keras.audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    ResampledReader,
    check_waveform,
    decode_audio,
    pad_batch,
)
from qn_keras.data.manifest import MANIFEST_EXTENSIONS
from qn_keras.decoding import beam_decode_ids, greedy_decode_ids
from qn_keras.errors import UserInputError
from qn_keras.featurizer import FeatureStatistics
from qn_keras.inference import FEATURES_REFUSED, refusal_message
from serving.recognizer import Recognizer


@dataclasses.dataclass(frozen=True)
class AudioItem:
    """One file to transcribe; ``offset``/``duration`` (seconds) select a segment, as in NeMo
    manifests; ``text`` is a reference transcript if the manifest has one."""

    path: Path
    offset: float = 0.0
    duration: float | None = None
    text: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    """How to transcribe.

    Args:
        batch_size: files per model call for files up to ``max_whole_seconds``.
        beam_width: 1 for greedy decoding, more for CTC prefix beam search (no LM).
        timestamps: add word start/end times (seconds) from the output frames.
        keep_logprobs: keep each file's ``[frames, vocabulary]`` log-probabilities.
        max_whole_seconds: longer files are transcribed in chunks.
        chunk_seconds: output covered by one chunk.
        context_seconds: extra audio each side of a chunk, whose outputs are dropped.
    """

    batch_size: int = 8
    beam_width: int = 1
    timestamps: bool = False
    keep_logprobs: bool = False
    max_whole_seconds: float = 60.0
    chunk_seconds: float = 30.0
    context_seconds: float = 5.0

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1. Received: {self.batch_size}")
        if self.beam_width < 1:
            raise UserInputError(f"beam_width must be >= 1. Received: {self.beam_width}")
        if self.chunk_seconds <= 0 or self.context_seconds < 0:
            raise UserInputError(
                "chunk_seconds must be > 0 and context_seconds >= 0. Received: "
                f"chunk_seconds={self.chunk_seconds}, context_seconds={self.context_seconds}"
            )


@dataclasses.dataclass
class Transcript:
    item: AudioItem
    text: str = ""
    duration: float = 0.0
    words: list[dict] | None = None
    logprobs: np.ndarray | None = None
    chunks: int = 0
    error: str | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        record = {"audio_filepath": str(self.item.path)}
        if self.item.offset:
            record["offset"] = self.item.offset
        record["duration"] = round(self.duration, 4)
        if self.error is not None:
            record.update(error=self.error, reason=self.reason)
            return record
        record["pred_text"] = self.text
        if self.item.text is not None:
            record["text"] = self.item.text
        if self.words is not None:
            record["words"] = self.words
        if self.chunks > 1:
            record["chunks"] = self.chunks
        return record


def _read_manifest(path: Path) -> list[AudioItem]:
    """A manifest's items, read as the rest of the project reads manifests
    (:mod:`qn_keras.data.manifest`): NeMo JSON lines or CSV/TSV, paths relative to the
    manifest, and ``duration`` applied only with an ``offset`` (a rounded duration never clips
    a whole file's last samples). A bad line is a ValueError naming ``file:line``."""
    from qn_keras.data.manifest import load_utterances

    return [
        AudioItem(
            path=Path(utt.audio_filepath),
            offset=utt.offset,
            duration=utt.read_duration,
            text=utt.text or None,
        )
        for utt in load_utterances(path)
    ]


def collect_inputs(inputs: Sequence[str | Path]) -> list[AudioItem]:
    """Files, folders (searched recursively for audio files) and manifests (NeMo ``.json`` /
    ``.jsonl``, ``.csv`` / ``.tsv``; paths relative to the manifest's folder) to a list of
    items, in the order given."""
    items: list[AudioItem] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
            )
            if not found:
                raise UserInputError(
                    f"No audio files ({', '.join(AUDIO_EXTENSIONS)}) under {path}."
                )
            items.extend(AudioItem(p) for p in found)
        elif path.suffix.lower() in MANIFEST_EXTENSIONS and path.is_file():
            items.extend(_read_manifest(path))
        elif path.is_file():
            items.append(AudioItem(path))
        else:
            raise FileNotFoundError(f"Input not found: {path}")
    return items


def token_spans(best_path: np.ndarray, blank_id: int) -> list[tuple[int, int, int]]:
    """``(label, first_frame, last_frame)`` of every token a CTC frame path emits: a token
    starts where the path enters a non-blank label different from the previous frame's."""
    spans: list[tuple[int, int, int]] = []
    previous = blank_id
    for t, label in enumerate(np.asarray(best_path).tolist()):
        if label != blank_id and label == previous and spans:
            spans[-1] = (label, spans[-1][1], t)
        elif label != blank_id:
            spans.append((label, t, t))
        previous = label
    return spans


def word_timestamps(
    spans: Iterable[tuple[int, int, int]], labels: Sequence[str], frame_seconds: float
) -> list[dict]:
    """Words (split at the space label) with ``start`` (first frame of their first character)
    and ``end`` (end of the last frame of their last character), in seconds."""
    words, chars, start, end = [], [], None, None

    def flush():
        if chars:
            words.append(
                {
                    "word": "".join(chars),
                    "start": round(start * frame_seconds, 3),
                    "end": round((end + 1) * frame_seconds, 3),
                }
            )

    for label, first, last in spans:
        if labels[label] == " ":
            flush()
            chars, start = [], None
            continue
        if start is None:
            start = first
        chars.append(labels[label])
        end = last
    flush()
    return words


def ctc_forced_align(logprobs: np.ndarray, ids: Sequence[int], blank_id: int) -> np.ndarray:
    """The most likely frame path (Viterbi) that emits exactly ``ids``; used to time words of
    a beam-search result, whose best path is not the per-frame argmax."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    num_frames = len(logprobs)
    states = [blank_id]
    for label in ids:
        states += [label, blank_id]
    states = np.asarray(states)
    num_states = len(states)
    if num_states * num_frames > 200_000_000:
        raise UserInputError(
            f"Aligning {len(ids)} characters to {num_frames} frames for word timestamps after "
            "beam search needs too much memory; use greedy decoding (--beam 1) for timestamps "
            "of files this long."
        )
    # A label may skip the blank before it unless it repeats the previous label.
    can_skip = np.zeros(num_states, dtype=bool)
    can_skip[2:] = (states[2:] != blank_id) & (states[2:] != states[:-2])
    score = np.full(num_states, -np.inf)
    score[0] = logprobs[0, states[0]]
    if num_states > 1:
        score[1] = logprobs[0, states[1]]
    back = np.zeros((num_frames, num_states), dtype=np.int8)
    for t in range(1, num_frames):
        stay = score
        step = np.concatenate([[-np.inf], score[:-1]])
        skip = np.where(can_skip, np.concatenate([[-np.inf, -np.inf], score[:-2]]), -np.inf)
        choices = np.stack([stay, step, skip])
        back[t] = np.argmax(choices, axis=0)
        score = choices[back[t], np.arange(num_states)] + logprobs[t, states]
    state = num_states - 1 if num_states == 1 or score[-1] >= score[-2] else num_states - 2
    path = np.empty(num_frames, dtype=np.int64)
    for t in range(num_frames - 1, -1, -1):
        path[t] = states[state]
        state -= back[t, state]
    return path


def receptive_field_seconds(block_args: dict, hop_seconds: float = 0.01) -> float:
    """How far (seconds, one side) an output frame sees into the audio: the context a chunk
    needs for chunked results to equal whole-file results exactly. Infinite with
    squeeze-and-excitation over the global context."""
    if any(block_args.get("stackwise_se", [])):
        return math.inf
    frames, stride = 0, 1
    for kernel, dilation, repeats, step in zip(
        block_args["stackwise_kernel_sizes"],
        block_args["stackwise_dilations"],
        block_args["stackwise_repeats"],
        block_args["stackwise_strides"],
        strict=True,
    ):
        frames += repeats * stride * dilation * (kernel - 1) // 2
        stride *= step
    # The featurizer's n_fft/2 window half adds under two hops.
    return (frames + 2) * hop_seconds


class Transcriber:
    """Transcribes :class:`AudioItem` s with a :class:`Recognizer`.

    Example:
        >>> transcriber = Transcriber(load_recognizer("runs/model"), TranscribeOptions())
        >>> [t.text for t in transcriber.transcribe(collect_inputs(["clip.wav"]))]
        ['hello world']
    """

    def __init__(
        self, recognizer: Recognizer, options: TranscribeOptions | None = None, decoder=None
    ):
        self.recognizer = recognizer
        self.options = options or TranscribeOptions()
        # An LM beam search (qn_keras.lm.decoder.LMDecoder), used instead of beam_width; one in
        # worker processes (ParallelLMDecoder) is started per file as the model's output comes.
        self.decoder = decoder
        self._search_elsewhere = hasattr(decoder, "decode_async")
        self.blank_id = len(recognizer.labels)
        cfg = recognizer.featurizer
        self.hop = cfg.hop_length
        # Feature frames of margin so that a piece's frames equal the whole file's: the STFT
        # window reaches n_fft/2 samples out, pre-emphasis one more.
        self.margin_frames = -(-(cfg.n_fft // 2 + 1) // self.hop) + 1
        # Largest chunk (in samples) a model call has seen; tests check that it is bounded.
        self.max_piece_samples = 0

    # Decoding -------------------------------------------------------------------------------

    def _finish(self, item, logprobs, length, duration, greedy_text=None, chunks=1, decoded=None):
        """The Transcript of one file's log-probs; ``decoded`` is a future of the LM search's
        result when it was started elsewhere."""
        opts = self.options
        logprobs = np.asarray(logprobs[:length], dtype=np.float32)
        if self.decoder is not None:
            decoded = decoded.result() if decoded is not None else self.decoder.decode(logprobs)
            words = decoded.words(self.recognizer.frame_seconds) if opts.timestamps else None
            return Transcript(
                item=item,
                text=decoded.text,
                duration=duration,
                words=words,
                logprobs=logprobs if opts.keep_logprobs else None,
                chunks=chunks,
            )
        if opts.beam_width > 1:
            ids = beam_decode_ids(logprobs, length, self.blank_id, opts.beam_width)
            text = self.recognizer.tokenizer.decode(ids)
        else:
            ids = greedy_decode_ids(logprobs, length, self.blank_id)
            text = greedy_text if greedy_text is not None else self.recognizer.tokenizer.decode(ids)
        words = None
        if opts.timestamps:
            if opts.beam_width > 1:
                path = ctc_forced_align(logprobs, ids, self.blank_id)
            else:
                path = np.argmax(logprobs, axis=-1)
            spans = token_spans(path, self.blank_id)
            words = word_timestamps(spans, self.recognizer.labels, self.recognizer.frame_seconds)
        return Transcript(
            item=item,
            text=text,
            duration=duration,
            words=words,
            logprobs=logprobs if opts.keep_logprobs else None,
            chunks=chunks,
        )

    # Short files ----------------------------------------------------------------------------

    def _decode(self, item: AudioItem) -> np.ndarray:
        cfg = self.recognizer.featurizer
        waveform = decode_audio(
            item.path, cfg.sample_rate, offset=item.offset, duration=item.duration
        )
        check_waveform(waveform, cfg.min_samples, cfg.sample_rate, name=str(item.path))
        return waveform

    def transcribe_batch(self, items: Sequence[AudioItem], waveforms: Sequence[np.ndarray]):
        """One padded model call for several decoded waveforms. An item the model's input
        checks refuse (non-finite features, say) gets ``error`` set; the others are
        transcribed."""
        return [finish() for finish in self._run_batch(items, waveforms)]

    def _run_batch(self, items, waveforms) -> list[Callable[[], Transcript]]:
        """The model call of :meth:`transcribe_batch`; decoding is left to the returned
        functions, one per item, so that it can overlap the next batch's model call."""
        batch, lengths = pad_batch(waveforms)
        self.max_piece_samples = max(self.max_piece_samples, int(lengths.max()))
        try:
            out = self.recognizer.serving_default(tf.constant(batch), tf.constant(lengths))
        except tf.errors.InvalidArgumentError as e:
            if len(items) > 1:  # find the item(s) at fault; the rest still get their text
                return [
                    finish
                    for item, waveform in zip(items, waveforms, strict=True)
                    for finish in self._run_batch([item], [waveform])
                ]
            refused = FEATURES_REFUSED in e.message
            reason = "non_finite_features" if refused else "invalid_audio"
            refusal = Transcript(
                item=items[0], error=f"{items[0].path}: {refusal_message(e)}", reason=reason
            )
            return [lambda: refusal]
        logprobs = out["logprobs"].numpy()
        out_lengths = out["logprob_lengths"].numpy()
        texts = [t.decode("utf-8") for t in out["transcripts"].numpy()]
        rate = self.recognizer.sample_rate
        finishers = []
        for b, item in enumerate(items):
            args = (item, logprobs[b], int(out_lengths[b]), lengths[b] / rate, texts[b])
            if self._search_elsewhere:
                future = self.decoder.decode_async(logprobs[b], int(out_lengths[b]))
                finishers.append(functools.partial(self._finish, *args, decoded=future))
            else:
                finishers.append(functools.partial(self._finish, *args))
        return finishers

    # Long files -----------------------------------------------------------------------------

    def _log_mel(self, reader: ResampledReader, first: int, last: int) -> np.ndarray:
        """Un-normalised log-mel frames ``[first, last)`` of the whole file, from a piece."""
        start = max(0, (first - self.margin_frames) * self.hop)
        stop = min(reader.length, (last + self.margin_frames) * self.hop)
        waveform = reader.read(start, stop)
        self.max_piece_samples = max(self.max_piece_samples, len(waveform))
        out = self.recognizer.log_mel(
            tf.constant(waveform[None, :]), tf.constant([len(waveform)], tf.int32)
        )
        offset = start // self.hop
        frames = out["log_mel"][0, first - offset : last - offset].numpy()
        if len(frames) != last - first:
            raise RuntimeError(f"featurized {len(frames)} frames, expected {last - first}")
        return frames

    def transcribe_long(self, item: AudioItem, progress: Callable[[float], None] | None = None):
        """Chunked transcription of one file in memory bounded by the chunk length."""
        opts = self.options
        cfg = self.recognizer.featurizer
        stride = self.recognizer.stride
        reader = ResampledReader(
            item.path, cfg.sample_rate, offset=item.offset, duration=item.duration
        )
        try:
            if reader.length < cfg.min_samples:
                raise AudioError("too_short", f"Audio is too short to transcribe: {item.path}")
            num_frames = int(cfg.num_frames(reader.length))
            frames_per_second = cfg.sample_rate / self.hop
            # Pass one: per-band mean and variance over the whole file.
            block = int(opts.chunk_seconds * frames_per_second) + 1
            statistics = FeatureStatistics(cfg.num_mels)
            for first in range(0, num_frames, block):
                statistics.add(self._log_mel(reader, first, min(num_frames, first + block)))

            # Pass two: chunks of output frames with context on both sides.
            out_frames = -(-num_frames // stride)
            chunk = max(1, int(round(opts.chunk_seconds * frames_per_second / stride)))
            context = int(math.ceil(opts.context_seconds * frames_per_second / stride))
            pieces = []
            for first_out in range(0, out_frames, chunk):
                last_out = min(out_frames, first_out + chunk)
                first = max(0, (first_out - context) * stride)
                last = min(num_frames, (last_out + context) * stride)
                raw = self._log_mel(reader, first, last)
                features = statistics.normalize(raw)
                if not np.all(np.isfinite(features)):
                    raise AudioError(
                        "non_finite_features",
                        f"Features of {item.path} are not finite (NaN or infinite values; "
                        "audio far beyond full scale?)",
                    )
                out = self.recognizer.encode(
                    tf.constant(features[None, :, :]), tf.constant([last - first], tf.int32)
                )
                logprobs = out["logprobs"][0].numpy()
                skip = first_out - first // stride
                pieces.append(logprobs[skip : skip + last_out - first_out])
                if progress:
                    progress((last_out - first_out) * stride / frames_per_second)
            logprobs = np.concatenate(pieces)
        finally:
            reader.close()
        duration = reader.length / cfg.sample_rate
        return self._finish(item, logprobs, len(logprobs), duration, chunks=len(pieces))

    # Everything -----------------------------------------------------------------------------

    def _duration(self, item: AudioItem) -> float:
        if not item.path.is_file():
            raise AudioError("missing_file", f"Audio file not found: {item.path}")
        try:
            info = sf.info(str(item.path))
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioError("unreadable_audio", f"Cannot decode audio {item.path}: {e}") from e
        available = max(info.frames / info.samplerate - item.offset, 0.0)
        return min(available, item.duration) if item.duration is not None else available

    def transcribe(
        self,
        items: Sequence[AudioItem],
        progress: Callable[[float], None] | None = None,
        on_result: Callable[[Transcript], None] | None = None,
        on_total: Callable[[float], None] | None = None,
    ) -> list[Transcript]:
        """Transcripts in the order of ``items``; a file that fails gets ``error`` set and the
        rest go on. ``on_total(seconds)`` gets the audio's total duration once known, and
        ``progress(seconds)`` is called as audio is processed."""
        opts = self.options
        results: list[Transcript | None] = [None] * len(items)

        def done(index, transcript):
            results[index] = transcript
            if on_result:
                on_result(transcript)

        short, long = [], []
        for index, item in enumerate(items):
            try:
                seconds = self._duration(item)
            except AudioError as e:
                done(index, Transcript(item=item, error=str(e), reason=e.reason))
                continue
            (long if seconds > opts.max_whole_seconds else short).append((seconds, index))
        if on_total:
            on_total(sum(seconds for seconds, _ in short + long))
        # Longest first: similar lengths share a batch, so little compute goes to padding.
        short.sort(reverse=True)
        batches = [short[i : i + opts.batch_size] for i in range(0, len(short), opts.batch_size)]

        def load(batch):
            loaded = []
            for _, index in batch:
                try:
                    loaded.append((index, self._decode(items[index]), None))
                except AudioError as e:
                    loaded.append((index, None, e))
            return loaded

        # With a decoder in worker processes (ParallelLMDecoder) each batch's beam search was
        # submitted with its model call and runs beside the next ones; results are collected
        # after the last batch.
        deferred = []

        # Decoding the next batch's audio overlaps with the model running on this one.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, batches[0]) if batches else None
            for number in range(len(batches)):
                loaded = pending.result()
                if number + 1 < len(batches):
                    pending = pool.submit(load, batches[number + 1])
                good = [(i, w) for i, w, e in loaded if e is None]
                for index, _, error in loaded:
                    if error is not None:
                        done(
                            index,
                            Transcript(item=items[index], error=str(error), reason=error.reason),
                        )
                if good:
                    finishers = self._run_batch([items[i] for i, _ in good], [w for _, w in good])
                    for (index, _), finish in zip(good, finishers, strict=True):
                        if self._search_elsewhere:
                            deferred.append((index, finish))
                        else:
                            done(index, finish())
                if progress:
                    progress(sum(seconds for seconds, _ in batches[number]))
        for index, finish in deferred:
            done(index, finish())
        for _, index in long:
            try:
                done(index, self.transcribe_long(items[index], progress))
            except AudioError as e:
                done(index, Transcript(item=items[index], error=str(e), reason=e.reason))
            except (sf.LibsndfileError, RuntimeError) as e:
                done(index, Transcript(item=items[index], error=str(e), reason="unreadable_audio"))
        return results
