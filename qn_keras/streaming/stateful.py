"""Stateful streaming of a limited-look-ahead QuartzNet: each chunk costs only its own frames.

A model built with ``lookahead`` (:func:`qn_keras.quartznet_backbone.lookahead_padding`) pads
every time convolution mostly on the past. Streaming it, each convolution keeps the last
``(K-1)*dilation`` input frames it saw as state and runs on ``state + chunk`` without padding;
residual branches, which skip the main branch's look-ahead, go through delay lines. The
front end keeps the samples its next STFT windows and pre-emphasis reach back to, and the
``adaptive``/``fixed`` normalizations (:mod:`qn_keras.streaming.normalization`) keep their sums.

Each layer's output is late by the look-ahead before it, so the rows a step returns are for
earlier output frames than the audio it was given: a step reports the output frame index of
its first row and which rows are valid (frames before the stream's start are discarded, and
after the last audio the caller feeds zeros, with ``end`` set, until every frame has come
out). Rows are valid exactly where the offline model has output frames, and their log-probs
equal the offline model's on the same normalization to float rounding, however the stream is
chunked (chunks of any multiple of :attr:`StreamingModel.granule` samples).

The whole state of a stream is two tensors the caller keeps, so a stateless server (TF
Serving) can host streams: ``state`` float32 ``[batch, state_size]`` and ``counters`` int32
``[batch, 3]`` = (model tag, samples consumed, last output label + 1). All zeros start a
stream (or an empty ``[batch, 0]`` state, where the signature leaves the width free, so that a
client need not know the size); a state made by another model is refused (its tag differs).

Only the ``current`` front-end era streams this way (the ``legacy`` era reflects the audio
at both ends), and not squeeze-and-excitation (a global average over the whole utterance).
"""

from __future__ import annotations

import dataclasses
import types
import zlib

import numpy as np
import tensorflow as tf

from qn_keras.choices import HEAD_LAYER
from qn_keras.errors import UserInputError
from qn_keras.featurizer import causal_normalize
from qn_keras.quartznet_backbone import same_padding, scale_kernel_size, total_lookahead
from qn_keras.quartznet_ctc import find_layer
from qn_keras.streaming.normalization import DEFAULT_PRIOR_FRAMES, FeaturePrior

# Lengths before the stream's end is known: far beyond any stream, small enough that the
# length arithmetic of strided layers cannot overflow int32.
_UNKNOWN_LENGTH = 2**29
COUNTERS = 3  # (tag, samples consumed, last label + 1)


def check_streamable(model, featurizer_config) -> None:
    """UserInputError saying why ``model`` has no stateful streaming mode, if it has none."""
    if getattr(model, "lookahead", None) is None:
        raise UserInputError(
            "This model sees its whole input (symmetric padding): it has no stateful "
            "streaming mode. Stream it in buffered mode, or train one with a `lookahead` "
            "(model.overrides.lookahead in the training config)."
        )
    cfg = featurizer_config
    if cfg.era != "current":
        raise UserInputError(
            "Stateful streaming needs the 'current' front end; this model uses the "
            f"{cfg.era!r} one (reflect padding at both ends). Use buffered mode."
        )
    blocks = model.block_args
    if any(blocks["stackwise_se"]):
        raise UserInputError("Stateful streaming cannot run squeeze-and-excitation blocks.")


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One piece of the flat state: ``rows`` frames of ``channels`` values at ``offset``."""

    name: str
    rows: int
    channels: int
    offset: int

    @property
    def size(self) -> int:
        return self.rows * self.channels


class _Layout:
    """Hands out the state's buffers by name while the step is built; the first (eager) pass
    records them, later passes slice the flat state where they were recorded."""

    def __init__(self):
        self.buffers: dict[str, Buffer] = {}
        self.recording = True
        self.state = None
        self.new_parts: list = []

    @property
    def size(self) -> int:
        return sum(b.size for b in self.buffers.values())

    def take(self, name: str, rows: int, channels: int, batch) -> tf.Tensor:
        if self.recording:
            if name in self.buffers:
                raise RuntimeError(f"state buffer {name} requested twice")
            self.buffers[name] = Buffer(name, rows, channels, self.size)
            return tf.zeros([batch, rows, channels])
        b = self.buffers[name]
        return tf.reshape(self.state[:, b.offset : b.offset + b.size], [-1, rows, channels])

    def put(self, name: str, value: tf.Tensor) -> None:
        b = self.buffers[name]
        self.new_parts.append((b.offset, tf.reshape(value, [-1, b.size])))


@dataclasses.dataclass
class _Stream:
    """A tensor of the encoder walk: rows at rate ``rate`` (feature frames per row) whose
    first row is ``delay`` rows before the step's start, and the valid length there."""

    x: tf.Tensor
    delay: int
    rate: int
    length: tf.Tensor


class StreamingModel(tf.Module):
    """The stream step of a limited-look-ahead :class:`~qn_keras.QuartzNetCTC` and its
    front end.

    ``step(audio, state, counters, end)``: ``audio`` float32 ``[batch, samples]`` (a multiple
    of :attr:`granule`), ``state``/``counters`` as the module docstring says, ``end`` int32
    ``[batch]``: the stream's total samples once the caller knows it (from the call with the
    last audio on), else -1. Returns ``logprobs`` ``[batch, samples / granule,
    vocabulary]``, ``valid`` bool (same rows), ``first_frame`` int32 ``[batch]`` (output frame
    of row 0), ``emitted`` int32 (same rows: the greedy CTC label a row adds to the
    transcript, -1 for none), ``state``, ``counters``.

    Args:
        model: a QuartzNetCTC built with ``lookahead`` (not None).
        featurizer: the model's :class:`~qn_keras.featurizer.LogMelSpectrogram`.
        prior: the feature prior (:class:`FeaturePrior`) normalization starts from, for a
            model whose front end normalizes per utterance; a front end that normalizes
            causally (``normalize: adaptive`` or ``fixed``, a model trained for streaming)
            brings its own, and the stream equals its offline output exactly.
        prior_frames: the prior's weight in frames (``adaptive``); None: ``fixed``.
        check: put the model-tag and shape assertions in the graph (TFLite drops them).
    """

    def __init__(
        self,
        model: tf.keras.Model,
        featurizer,
        prior: FeaturePrior | None = None,
        prior_frames: float | None = DEFAULT_PRIOR_FRAMES,
        check: bool = True,
        name=None,
    ):
        super().__init__(name=name)
        check_streamable(model, featurizer.config)
        cfg = featurizer.config
        blocks = model.block_args
        # A plain namespace is not tracked by tf.Module: saving keeps the variables only.
        self._keras = types.SimpleNamespace(model=model, featurizer=featurizer)
        self.model_variables = list(model.variables)
        self.config = cfg
        self.blocks = blocks
        self.kernel_size_factor = model.kernel_size_factor
        self.vocabulary_size = int(model.vocabulary_size)
        if cfg.causal:
            # A model trained for streaming: its own front end says how to normalize.
            self.prior_mean, self.prior_var, self.prior_frames = featurizer.prior_tensors()
            prior = FeaturePrior(cfg.prior_mean, cfg.prior_std)
            prior_frames = self.prior_frames
        else:
            if prior is None:
                raise UserInputError("Stateful streaming needs a feature prior.")
            if prior.num_mels != cfg.num_mels:
                raise UserInputError(
                    f"The feature prior has {prior.num_mels} bands, not {cfg.num_mels}."
                )
            self.prior_mean = tf.constant(np.asarray(prior.mean, np.float32))
            self.prior_var = tf.constant(np.asarray(prior.std, np.float32) ** 2)
            self.prior_frames = None if prior_frames is None else float(prior_frames)
        self.check = check
        stride = 1
        for s in blocks["stackwise_strides"]:
            stride *= int(s)
        self.stride = stride
        self.granule = stride * cfg.hop_length  # samples per output frame
        self.lookahead_frames = total_lookahead(blocks, model.kernel_size_factor, model.lookahead)
        # The front end's window reaches n_fft/2 samples ahead of a frame's centre, pre-emphasis
        # one sample behind its start.
        self.audio_history = cfg.n_fft // 2 + cfg.hop_length + 1
        self.tag = self._tag(model, cfg, prior, prior_frames)
        self._layout = _Layout()
        self._build(
            tf.zeros([1, self.granule]),
            tf.zeros([1, 0]),
            tf.zeros([1, COUNTERS], tf.int32),
            tf.constant([-1]),
        )
        self._layout.recording = False
        self.state_size = self._layout.size
        self.buffers = dict(self._layout.buffers)

    @staticmethod
    def _tag(model, cfg, prior, prior_frames) -> int:
        """A non-zero 30-bit fingerprint of the weights, front end and normalization: state is
        only meaningful to the model that made it."""
        crc = zlib.crc32(repr((cfg.to_dict(), prior.to_dict(), prior_frames)).encode())
        for w in model.get_weights():
            crc = zlib.crc32(np.ascontiguousarray(w).tobytes(), crc)
        return (crc & 0x3FFFFFFF) or 1

    # The walk -------------------------------------------------------------------------------

    def _mask(self, s: _Stream, done) -> tf.Tensor:
        """Zeroes rows outside ``[0, length)``: before the stream began (the offline model's
        zero padding) and past its end."""
        rows = tf.shape(s.x)[1]
        position = (
            (done // (self.config.hop_length * s.rate))[:, None] - s.delay + tf.range(rows)[None]
        )
        valid = tf.logical_and(position >= 0, position < s.length[:, None])
        return s.x * tf.cast(valid, s.x.dtype)[:, :, None, None]

    def _conv(self, name, layer, s: _Stream, kernel, stride, dilation, right, batch) -> _Stream:
        """A time convolution on ``state + rows``; ``right``: its future padding."""
        span = dilation * (kernel - 1)
        x = s.x
        if span:
            history = self._layout.take(name, span, x.shape[-1], batch)
            x = tf.concat([history[:, :, None, :], x], axis=1)
            self._layout.put(name, x[:, -span:, 0, :])
        first = (right + s.delay) % stride  # the first row an output window starts at
        delay = (s.delay + right - first) // stride
        return _Stream(layer(x[:, first:]), delay, s.rate * stride, s.length)

    def _delay(self, name, x, rows, batch) -> tf.Tensor:
        """``x`` late by ``rows`` rows (a residual branch meeting a main branch that looks ahead)."""
        if not rows:
            return x
        history = self._layout.take(name, rows, x.shape[-1], batch)
        z = tf.concat([history[:, :, None, :], x], axis=1)
        self._layout.put(name, z[:, -rows:, 0, :])
        return z[:, : tf.shape(x)[1]]

    def _front_end(self, audio, counters, end, batch):
        cfg = self.config
        featurizer = self._keras.featurizer
        done = counters[:, 1]
        history = self._layout.take("audio", self.audio_history, 1, batch)[:, :, 0]
        z = tf.concat([history, audio], axis=1)
        self._layout.put("audio", z[:, -self.audio_history :])
        emphasized = z[:, 1:] - cfg.preemph * z[:, :-1] if cfg.preemph else z[:, 1:]
        # Sample positions of `emphasized`; the current era zeroes samples past the end.
        first_sample = done - (self.audio_history - 1)
        positions = first_sample[:, None] + tf.range(tf.shape(emphasized)[1])[None]
        total = tf.where(end >= 0, end, _UNKNOWN_LENGTH)
        emphasized = emphasized * tf.cast(positions < total[:, None], emphasized.dtype)
        frames = tf.signal.frame(emphasized, cfg.n_fft, cfg.hop_length)
        log_mel = featurizer.frames_to_log_mel(frames)  # [B, samples / hop, mels]
        # Frame t's window starts at t*hop - n_fft/2: row 0 is frame done/hop - delay.
        delay = (self.audio_history - 1 - cfg.n_fft // 2) // cfg.hop_length
        feature_length = tf.where(end >= 0, end // cfg.hop_length, _UNKNOWN_LENGTH)
        index = (done // cfg.hop_length)[:, None] - delay + tf.range(tf.shape(log_mel)[1])[None]
        valid = tf.cast(tf.logical_and(index >= 0, index < feature_length[:, None]), tf.float32)
        features = self._normalize(log_mel, valid[:, :, None], batch)
        return _Stream(features[:, :, None, :], delay, 1, feature_length)

    def _normalize(self, log_mel, valid, batch):
        if self.prior_frames is None:
            return causal_normalize(log_mel, valid, self.prior_mean, self.prior_var, None)[0]
        sums = self._layout.take("norm_sums", 3, self.config.num_mels, batch)
        features, sums = causal_normalize(
            log_mel, valid, self.prior_mean, self.prior_var, self.prior_frames, sums
        )
        self._layout.put("norm_sums", sums)
        return features

    def _block(self, i, cfg, kernel, s: _Stream, done, batch) -> _Stream:
        model = self._keras.model
        for j in range(cfg["repeats"]):
            prefix = f"block_{i}_sub_{j}"
            stride = cfg["strides"] if j == cfg["repeats"] - 1 else 1
            dilation = cfg["dilations"]
            pad = same_padding(kernel, stride, dilation)
            right = find_layer(model, f"{prefix}_pad").padding[0][1] if pad else 0
            s = _Stream(self._mask(s, done), s.delay, s.rate, s.length)
            conv_name = f"{prefix}_depthwise" if cfg["separable"] else f"{prefix}_conv"
            length = find_layer(model, f"{prefix}_lengths")(s.length)
            s = self._conv(
                conv_name, find_layer(model, conv_name), s, kernel, stride, dilation, right, batch
            )
            s.length = length
            x = s.x
            if cfg["separable"]:
                x = find_layer(model, f"{prefix}_pointwise")(self._mask(s, done))
            x = find_layer(model, f"{prefix}_bn")(x, training=False)
            if cfg["groups"] > 1:
                x = find_layer(model, f"{prefix}_shuffle")(x)
            if j < cfg["repeats"] - 1:
                x = find_layer(model, f"{prefix}_act")(x)
            s = _Stream(x, s.delay, s.rate, s.length)
        return s

    def _build(self, audio, state, counters, end):
        """The step's tensors (see the class docstring) and the new state."""
        layout = self._layout
        layout.state, layout.new_parts = state, []
        model = self._keras.model
        batch = tf.shape(audio)[0]
        done = counters[:, 1]
        s = self._front_end(audio, counters, end, batch)
        dense = [s]
        residual_panes = 0
        blocks = self.blocks
        for i in range(len(blocks["stackwise_filters"])):
            cfg = {name[len("stackwise_") :]: values[i] for name, values in blocks.items()}
            dense_residual = cfg["residual_dense"]
            residual_panes += 1 if dense_residual else 0
            block_input = dense[-1]
            kernel = scale_kernel_size(cfg["kernel_sizes"], self.kernel_size_factor)
            out = self._block(i, cfg, kernel, block_input, done, batch)
            x = out.x
            if cfg["residual"]:
                sources = dense if dense_residual else [block_input]
                for p, source in enumerate(sources):
                    stride = cfg["strides"]
                    res = self._mask(source, done)
                    first = source.delay % stride
                    res = find_layer(model, f"block_{i}_res_{p}_conv")(res[:, first:])
                    res = find_layer(model, f"block_{i}_res_{p}_bn")(res, training=False)
                    lag = out.delay - (source.delay - first) // stride
                    res = self._delay(f"block_{i}_res_{p}_delay", res, lag, batch)
                    x = find_layer(model, f"block_{i}_res_{p}_add")([x, res])
            x = find_layer(model, f"block_{i}_out_act")(x)
            out = _Stream(x, out.delay, out.rate, out.length)
            dense = dense + [out] if (cfg["residual"] and dense_residual) else [out]
        last = dense[-1]
        encoded = tf.squeeze(last.x, axis=2)
        logits = find_layer(model, HEAD_LAYER)(encoded)
        logprobs = find_layer(model, "logprobs")(logits)
        first_frame = done // self.granule - last.delay
        frames = first_frame[:, None] + tf.range(tf.shape(logprobs)[1])[None]
        valid = tf.logical_and(frames >= 0, frames < last.length[:, None])
        if layout.recording:
            return None
        # Greedy CTC labels as they become final: a row emits its argmax unless blank or a
        # repeat of the row before (the previous step's last row for row 0). Invalid rows
        # count as blank, which is what precedes the stream.
        blank = self.vocabulary_size - 1
        ids = tf.where(valid, tf.argmax(logprobs, axis=-1, output_type=tf.int32), blank)
        previous = tf.where(counters[:, 2] > 0, counters[:, 2] - 1, blank)
        before = tf.concat([previous[:, None], ids[:, :-1]], axis=1)
        emitted = tf.where(tf.logical_and(ids != blank, ids != before), ids, -1)
        parts = [p for _, p in sorted(layout.new_parts, key=lambda item: item[0])]
        new_state = tf.concat(parts, axis=1)
        return {
            "logprobs": logprobs,
            "valid": valid,
            "first_frame": first_frame,
            "emitted": emitted,
            "state": new_state,
            "done": done + tf.shape(audio)[1],
            "last": ids[:, -1] + 1,
        }

    # The step -------------------------------------------------------------------------------

    def step(self, audio, state, counters, end):
        """One chunk of every stream in the batch (see the class docstring)."""
        audio = tf.convert_to_tensor(audio, tf.float32)
        state = tf.convert_to_tensor(state, tf.float32)
        counters = tf.convert_to_tensor(counters, tf.int32)
        end = tf.convert_to_tensor(end, tf.int32)
        if state.shape[1] is None:  # a signature with a free state width: empty starts a stream
            batch = tf.shape(audio)[0]
            state = tf.cond(
                tf.equal(tf.size(state), 0),
                lambda: tf.zeros([batch, self.state_size]),
                lambda: state,
            )
        if self.check:
            checks = self._checks(audio, state, counters, end)
            with tf.control_dependencies(checks):  # nothing runs before the checks pass
                audio, state, counters, end = (
                    tf.identity(t) for t in (audio, state, counters, end)
                )
        out = self._build(audio, state, counters, end)
        done, last = out.pop("done"), out.pop("last")
        out["counters"] = tf.stack([tf.fill(tf.shape(done), self.tag), done, last], axis=1)
        return out

    def _checks(self, audio, state, counters, end) -> list:
        samples = tf.shape(audio)[1]
        tags = counters[:, 0]
        return [
            tf.debugging.assert_equal(
                samples % self.granule,
                0,
                message=f"audio chunks must be a multiple of {self.granule} samples "
                f"({1000 * self.granule / self.config.sample_rate:.0f} ms)",
            ),
            tf.debugging.assert_equal(
                tf.shape(state)[1],
                self.state_size,
                message=f"state must have {self.state_size} values per stream for this model",
            ),
            tf.debugging.assert_equal(
                tf.shape(counters)[0], tf.shape(audio)[0], message="one counters row per stream"
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.logical_or(tf.equal(tags, self.tag), tf.equal(counters[:, 1], 0))),
                ["the stream state was made by another model (or changed): start a new stream"],
            ),
            tf.debugging.Assert(
                tf.reduce_all(counters[:, 1] % self.granule == 0),
                ["the stream state's sample count is corrupt"],
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(audio)), ["audio has non-finite samples"]
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.logical_or(end < 0, end <= counters[:, 1] + samples)),
                ["end lies past the audio given so far"],
            ),
        ]

    def initial_state(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.zeros([batch, self.state_size], np.float32),
            np.zeros([batch, COUNTERS], np.int32),
        )

    def flush_samples(self) -> int:
        """Zeros to feed after the last audio so every output frame comes out: the look-ahead,
        the front end's window and the stride's rounding, in whole granules."""
        samples = (
            self.lookahead_frames + 2 * self.stride + self.config.n_fft // self.config.hop_length
        )
        samples *= self.config.hop_length
        return -(-samples // self.granule) * self.granule

    def info(self) -> dict:
        """What a client needs to drive the step (written beside exported streaming models)."""
        return {
            "granule_samples": self.granule,
            "state_size": self.state_size,
            "counters": COUNTERS,
            "flush_samples": self.flush_samples(),
            # The encoder's look-ahead plus the front end's: a frame's window reaches n_fft/2
            # samples past its centre.
            "lookahead_seconds": (
                self.lookahead_frames * self.config.hop_length + self.config.n_fft // 2
            )
            / self.config.sample_rate,
            "normalization": "fixed" if self.prior_frames is None else "adaptive",
            "prior_frames": self.prior_frames,
            "tag": self.tag,
        }
