"""`StreamingRecognizer`: audio in as it arrives, final and partial text out.

Two engines behind one interface (``feed(samples)``, ``finish()``):

- :class:`BufferedEngine`, for any model (trained here or imported from NeMo): the audio is
  featurized as it comes, frame for frame as the whole file would be; each chunk of output
  frames is computed from features with ``left`` and ``right`` context around it and only the
  chunk's own outputs are kept, stitched at the output-frame level as long-file transcription
  does (NeMo's buffered CTC inference). The right context's outputs are the partial
  hypothesis. Latency: chunk + right context.
- :class:`StatefulEngine`, for models trained with a ``lookahead``: each chunk runs once
  through the stream step (:class:`~qn_keras.streaming.stateful.StreamingModel`, a SavedModel's
  ``stream_step`` or a TFLite streaming model), which carries every convolution's state. Latency:
  chunk + the model's look-ahead; its output equals the model's offline output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from qn_keras.errors import UserInputError
from qn_keras.featurizer import FeaturizerConfig
from qn_keras.streaming.normalization import (
    DEFAULT_PRIOR_FRAMES,
    FeaturePrior,
    Normalizer,
    resolve,
)

MODES = ("auto", "buffered", "stateful")


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """How to stream.

    Args:
        mode: ``buffered``, ``stateful``, or ``auto`` (stateful when the model has a stream
            step, else buffered).
        chunk_seconds: audio per model call (rounded to whole output frames).
        left_seconds, right_seconds: buffered mode's context on each side of a chunk.
        normalization: ``running``, ``pooled``, ``adaptive`` or ``fixed``
            (:mod:`qn_keras.streaming.normalization`); None: ``running`` in buffered mode,
            ``adaptive`` in stateful mode.
        prior_frames: the feature prior's weight in frames (``adaptive``).
        keep_logprobs: keep every final output frame's log-probs (:attr:`logprobs`).
    """

    mode: str = "auto"
    chunk_seconds: float = 1.0
    left_seconds: float = 2.0
    right_seconds: float = 0.5
    normalization: str | None = None
    prior_frames: float = DEFAULT_PRIOR_FRAMES
    keep_logprobs: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserInputError(f"Unknown streaming mode {self.mode!r}; choose from {MODES}.")
        if not self.chunk_seconds > 0 or self.left_seconds < 0 or self.right_seconds < 0:
            raise UserInputError(
                "chunk_seconds must be > 0 and the contexts >= 0. Received: "
                f"{self.chunk_seconds}, {self.left_seconds}, {self.right_seconds}"
            )


@dataclasses.dataclass(frozen=True)
class StreamUpdate:
    """What one ``feed`` changed: ``final`` text that became final with it, ``partial`` the
    current guess at what follows, ``text`` everything final so far."""

    final: str
    partial: str
    text: str


class GreedyText:
    """Greedy CTC decoding that continues across calls: repeats merge over call boundaries."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.blank = len(self.labels)
        self.last = self.blank

    def _ids(self, logprobs: np.ndarray, last: int) -> tuple[list[int], int]:
        out = []
        for label in np.argmax(logprobs, axis=-1).tolist() if len(logprobs) else []:
            if label != self.blank and label != last:
                out.append(label)
            last = label
        return out, last

    def commit(self, logprobs: np.ndarray) -> str:
        ids, self.last = self._ids(logprobs, self.last)
        return "".join(self.labels[i] for i in ids)

    def peek(self, logprobs: np.ndarray) -> str:
        ids, _ = self._ids(logprobs, self.last)
        return "".join(self.labels[i] for i in ids)


# Engines: push(samples) -> (final log-probs, partial log-probs); finish() -> final log-probs.


class BufferedEngine:
    """Buffered streaming over ``log_mel(waveform, lengths)`` and ``encode(features, lengths)``
    (the functions of :class:`qn_keras.inference.SpeechRecognizer`, saved with every model)."""

    def __init__(
        self,
        log_mel: Callable,
        encode: Callable,
        featurizer: FeaturizerConfig,
        stride: int,
        settings: StreamSettings,
        prior: FeaturePrior | None = None,
    ):
        import tensorflow as tf

        self._tf = tf
        self.log_mel_fn, self.encode_fn = log_mel, encode
        self.cfg, self.stride = featurizer, int(stride)
        frames_per_second = featurizer.sample_rate / featurizer.hop_length
        per_out = frames_per_second / self.stride
        self.chunk = max(1, round(settings.chunk_seconds * per_out))
        self.left = math.ceil(settings.left_seconds * per_out)
        self.right = math.ceil(settings.right_seconds * per_out)
        rule, prior, prior_frames = resolve(
            featurizer, settings.normalization, prior, settings.prior_frames
        )
        self.normalizer = Normalizer(rule, featurizer.num_mels, prior, prior_frames)
        self.hop = featurizer.hop_length
        # Feature frames of margin so that a piece's frames equal the whole stream's.
        self.margin = -(-(featurizer.n_fft // 2 + 1) // self.hop) + 1
        self.audio = np.zeros(0, np.float32)
        self.audio_start = 0  # stream index of self.audio[0]
        self.received = 0
        # Frames as the normalizer keeps them (normalized already for frame-causal rules).
        self.frames = np.zeros((0, featurizer.num_mels), np.float32)
        self.frames_start = 0  # stream frame of self.frames[0]
        self.next_out = 0  # first output frame not yet final
        self.max_piece_samples = 0
        self._partial = np.zeros((0, 0), np.float32)
        self._partial_at = 0  # frames there were when the partial guess was made

    @property
    def latency_seconds(self) -> float:
        return (self.chunk + self.right) * self.stride * self.hop / self.cfg.sample_rate

    def _frames_end(self) -> int:
        return self.frames_start + len(self.frames)

    def _featurize(self, final: bool) -> None:
        """Appends the frames the audio received so far determines (all of them if final)."""
        cfg = self.cfg
        if final:
            ready = int(cfg.num_frames(self.received))
        else:
            ready = max(0, (self.received - cfg.n_fft // 2) // self.hop + 1)
            if cfg.era == "current":
                ready = min(ready, int(cfg.num_frames(self.received)))
        first = self._frames_end()
        if ready <= first:
            return
        start = max(0, (first - self.margin) * self.hop)
        stop = self.received if final else min(self.received, (ready + self.margin) * self.hop)
        piece = self.audio[start - self.audio_start : stop - self.audio_start]
        self.max_piece_samples = max(self.max_piece_samples, len(piece))
        tf = self._tf
        out = self.log_mel_fn(tf.constant(piece[None, :]), tf.constant([len(piece)], tf.int32))
        offset = start // self.hop
        new = out["log_mel"][0, first - offset : ready - offset].numpy()
        if len(new) != ready - first:
            raise RuntimeError(f"featurized {len(new)} frames, expected {ready - first}")
        if not np.all(np.isfinite(new)):
            raise UserInputError(
                "The stream's features are not finite (audio far beyond full scale?)."
            )
        self.frames = np.concatenate([self.frames, self.normalizer.add(new)])

    def _run(self, first_out: int, last_out: int, final: bool):
        """Output frames ``[first_out, ...)`` from features around ``[first_out, last_out)``;
        returns the log-probs from ``first_out`` on and the stream's output length if known."""
        stride = self.stride
        first = max(self.frames_start, (first_out - self.left) * stride)
        last = min(self._frames_end(), (last_out + self.right) * stride)
        kept = self.frames[first - self.frames_start : last - self.frames_start]
        features = self.normalizer.normalize(kept)
        tf = self._tf
        out = self.encode_fn(tf.constant(features[None]), tf.constant([last - first], tf.int32))
        length = int(out["logprob_lengths"][0])
        logprobs = out["logprobs"][0, :length].numpy()
        skip = first_out - first // stride
        total = first // stride + length if final and last == self._frames_end() else None
        return logprobs[skip:], total

    def _forget(self) -> None:
        keep_frame = max(0, (self.next_out - self.left) * self.stride - 1)
        drop = keep_frame - self.frames_start
        if drop > 0:
            self.frames = self.frames[drop:]
            self.frames_start += drop
        # Featurizing frame t reads samples from (t - margin) * hop on.
        drop = max(0, (self._frames_end() - self.margin) * self.hop) - self.audio_start
        if drop > 0:
            self.audio = self.audio[drop:]
            self.audio_start += drop

    def push(self, samples: np.ndarray):
        self.audio = np.concatenate([self.audio, samples])
        self.received += len(samples)
        self._featurize(final=False)
        final_parts = []
        needed = lambda: (self.next_out + self.chunk + self.right) * self.stride  # noqa: E731
        while self._frames_end() >= needed():
            logprobs, _ = self._run(self.next_out, self.next_out + self.chunk, final=False)
            final_parts.append(logprobs[: self.chunk])
            self.next_out += self.chunk
        # The partial guess costs a model call: made again after a commit, or once a quarter
        # chunk of new audio has come (not on every 0.1 s block a microphone delivers).
        fresh = self._frames_end() - self._partial_at >= max(1, self.chunk * self.stride // 4)
        if final_parts or fresh:
            self._partial = np.zeros((0, 0), np.float32)
            if self._frames_end() > self.next_out * self.stride:
                self._partial, _ = self._run(self.next_out, self.next_out + self.chunk, False)
            self._partial_at = self._frames_end()
        self._forget()
        return final_parts, self._partial

    def finish(self):
        if self.received < self.cfg.min_samples:
            raise UserInputError(
                f"The stream has {self.received} samples, fewer than the {self.cfg.min_samples} "
                "needed to transcribe anything."
            )
        self._featurize(final=True)
        parts = []
        while True:
            logprobs, total = self._run(self.next_out, self.next_out + self.chunk, final=True)
            if total is not None:  # this piece reached the stream's last frame
                parts.append(logprobs[: total - self.next_out])
                self.next_out = total
                return parts
            parts.append(logprobs[: self.chunk])
            self.next_out += self.chunk


class StatefulEngine:
    """Stateful streaming over a stream step ``step(audio, state, counters, end) -> dict``
    (:meth:`StreamingModel.step`, a SavedModel's ``stream_step``, a TFLite streaming model,
    a server's ``stream_step``) described by ``info`` (:meth:`StreamingModel.info`; without
    it, an empty state starts the stream and chunks are whole multiples of 80 ms, which every
    preset's output frame divides)."""

    # Samples per output frame of any preset (stride 8 at most, 10 ms hops at 16 kHz).
    ANY_GRANULE = 1280

    def __init__(self, step: Callable, info: dict | None, featurizer: FeaturizerConfig, settings):
        info = info or {}
        self.step_fn = step
        self.cfg = featurizer
        granule = int(info.get("granule_samples") or self.ANY_GRANULE)
        self.lookahead_seconds = float(info.get("lookahead_seconds") or 0.0)
        self.chunk = int(info.get("chunk_samples") or 0) or granule * max(
            1, round(settings.chunk_seconds * featurizer.sample_rate / granule)
        )
        # Zeros after the last audio before giving up on the stream's last frames.
        self.max_flush = int(info.get("flush_samples") or 10 * featurizer.sample_rate)
        self.state = np.zeros([1, int(info.get("state_size", 0))], np.float32)
        self.counters = np.zeros([1, int(info.get("counters", 3))], np.int32)
        self.pending = np.zeros(0, np.float32)
        self.received = 0
        self.next_out = 0
        self.steps = 0
        self.ended = False

    @property
    def latency_seconds(self) -> float:
        return self.chunk / self.cfg.sample_rate + self.lookahead_seconds

    def _step(self, audio: np.ndarray, end: int) -> np.ndarray:
        out = self.step_fn(
            audio[None].astype(np.float32), self.state, self.counters, np.array([end], np.int32)
        )
        out = {k: np.asarray(v) for k, v in out.items()}
        self.state, self.counters = out["state"], out["counters"]
        self.steps += 1
        frames = int(out["first_frame"][0]) + np.arange(out["logprobs"].shape[1])
        valid = out["valid"][0].astype(bool)
        # Past the end: a row at a real position that is not valid any more.
        self.ended = end >= 0 and bool(np.any((frames >= 0) & ~valid))
        keep = valid & (frames >= self.next_out)
        rows = out["logprobs"][0][keep]
        if len(rows):
            if frames[keep][0] != self.next_out:
                raise RuntimeError("the stream step skipped output frames")
            self.next_out += len(rows)
        return rows

    def push(self, samples: np.ndarray):
        self.pending = np.concatenate([self.pending, samples])
        self.received += len(samples)
        parts = []
        while len(self.pending) >= self.chunk:
            parts.append(self._step(self.pending[: self.chunk], -1))
            self.pending = self.pending[self.chunk :]
        return parts, np.zeros((0, 0), np.float32)

    def finish(self):
        if self.received < self.cfg.min_samples:
            raise UserInputError(
                f"The stream has {self.received} samples, fewer than the {self.cfg.min_samples} "
                "needed to transcribe anything."
            )
        # The rest of the audio padded to a chunk, then chunks of zeros, all with the end
        # given, until a step's rows pass the stream's last output frame.
        tail = np.pad(self.pending, (0, -len(self.pending) % self.chunk))
        self.pending = np.zeros(0, np.float32)
        parts, fed = [], 0
        while not self.ended:
            if fed >= len(tail) and fed - len(tail) > self.max_flush:
                raise RuntimeError("the stream step did not reach the end of the stream")
            audio = tail[fed : fed + self.chunk] if fed < len(tail) else np.zeros(self.chunk)
            parts.append(self._step(audio, self.received))
            fed += self.chunk
        return parts


class StreamingRecognizer:
    """Live transcription of one stream: ``feed(samples)`` as audio arrives (float32 at the
    model's rate, any number of samples), ``finish()`` at the end.

    Example:
        >>> stream = StreamingRecognizer.from_bundle(load_model_dir("runs/model"))
        >>> for block in blocks_of(audio, 1600):
        ...     update = stream.feed(block)
        ...     print(update.text, "|", update.partial)
        >>> stream.finish()
        'hello world'
    """

    def __init__(self, engine, labels: Sequence[str], settings: StreamSettings):
        self.engine = engine
        self.settings = settings
        self.decoder = GreedyText(labels)
        self.text = ""
        self.finished = False
        self._logprobs: list[np.ndarray] = []

    @property
    def mode(self) -> str:
        return "stateful" if isinstance(self.engine, StatefulEngine) else "buffered"

    @property
    def latency_seconds(self) -> float:
        """Algorithmic latency: chunk + right context (buffered) or look-ahead (stateful)."""
        return self.engine.latency_seconds

    @property
    def logprobs(self) -> np.ndarray:
        """Final output frames' log-probs so far (``keep_logprobs``)."""
        if not self.settings.keep_logprobs:
            raise UserInputError("Create the recognizer with keep_logprobs=True to keep them.")
        return np.concatenate(self._logprobs) if self._logprobs else np.zeros((0, 0))

    def _commit(self, parts) -> str:
        new = ""
        for part in parts:
            if len(part):
                new += self.decoder.commit(part)
                if self.settings.keep_logprobs:
                    self._logprobs.append(part)
        self.text += new
        return new

    def feed(self, samples) -> StreamUpdate:
        if self.finished:
            raise UserInputError("This stream has finished; start a new one.")
        samples = np.asarray(samples)
        if samples.dtype.kind != "f":
            raise UserInputError(
                f"Stream samples must be floating point in [-1, 1]; received {samples.dtype} "
                "(convert 16-bit PCM with samples / 32768)."
            )
        if samples.ndim != 1:
            raise UserInputError(f"Feed mono samples (1-D); received shape {samples.shape}.")
        if not np.all(np.isfinite(samples)):
            raise UserInputError("Stream samples must be finite (no NaN or infinity).")
        parts, partial = self.engine.push(samples.astype(np.float32))
        new = self._commit(parts)
        return StreamUpdate(new, self.decoder.peek(partial) if partial.size else "", self.text)

    def finish(self) -> str:
        """Flushes the stream; returns the whole final transcript."""
        if not self.finished:
            self.finished = True
            self._commit(self.engine.finish())
        return self.text.strip()

    # Construction ---------------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, bundle, settings: StreamSettings | None = None, prior=None):
        """A stream over a model folder's bundle (:class:`qn_keras.model_dir.ModelBundle`)."""
        from qn_keras.inference import SpeechRecognizer
        from qn_keras.streaming.normalization import prior_from_metadata

        settings = settings or StreamSettings()
        prior = prior or prior_from_metadata(bundle.metadata)
        mode = settings.mode
        if mode == "auto":  # stateful when the model can: a look-ahead limit and a prior
            streamable = getattr(bundle.model, "lookahead", None) is not None
            can = streamable and (bundle.featurizer.causal or prior is not None)
            mode = "stateful" if can and bundle.featurizer.era == "current" else "buffered"
        if mode == "stateful":
            step, info = stream_step_of(bundle, settings, prior)
            return cls(
                StatefulEngine(step, info, bundle.featurizer, settings),
                bundle.tokenizer.labels,
                settings,
            )
        module = SpeechRecognizer(bundle)
        engine = BufferedEngine(
            module.log_mel, module.encode, bundle.featurizer, module.stride, settings, prior
        )
        engine.owner = module  # bound tf.functions hold only a weak reference to it
        return cls(engine, bundle.tokenizer.labels, settings)


def stream_step_of(bundle, settings: StreamSettings, prior: FeaturePrior | None):
    """``(step, info)`` of a bundle's stateful stream step, with the settings' normalization."""
    import tensorflow as tf

    from qn_keras.streaming.stateful import StreamingModel, check_streamable

    check_streamable(bundle.model, bundle.featurizer)
    if bundle.featurizer.causal:  # trained for streaming: the front end's own rule and prior
        resolve(bundle.featurizer, settings.normalization, None, settings.prior_frames)
        model = StreamingModel(bundle.model, bundle.featurizer_layer())
    else:
        rule = settings.normalization or "adaptive"
        if rule in ("running", "pooled"):
            raise UserInputError(
                "Stateful streaming normalizes frame by frame ('adaptive' or 'fixed'); "
                f"{rule!r} depends on the chunking and is for buffered mode."
            )
        if prior is None:
            raise UserInputError(
                "Stateful streaming needs the model's feature prior (the average training "
                "utterance's statistics), which this model folder lacks: add it with "
                "`qn model prior MODEL AUDIO...`."
            )
        model = StreamingModel(
            bundle.model,
            bundle.featurizer_layer(),
            prior,
            None if rule == "fixed" else settings.prior_frames,
        )
    function = tf.function(
        model.step,
        input_signature=[
            tf.TensorSpec([None, None], tf.float32),
            tf.TensorSpec([None, model.state_size], tf.float32),
            tf.TensorSpec([None, 3], tf.int32),
            tf.TensorSpec([None], tf.int32),
        ],
    )

    def step(audio, state, counters, end):
        return function(audio, state, counters, end)

    step.owner = model
    return step, model.info()
