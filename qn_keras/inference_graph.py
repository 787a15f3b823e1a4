"""The acoustic model's arithmetic rewritten for inference (the serving graph's encoder).

The Keras model (:class:`~qn_keras.quartznet_ctc.QuartzNetCTC`) is laid out for training and
for tfmot: ``[batch, time, 1, channels]`` tensors, height-1 ``DepthwiseConv2D`` layers, a
BatchNormalization after every convolution and a sequence mask before every convolution.
:class:`InferenceEncoder` computes the same valid outputs with three changes, each measured
(``bench/bench_inference.py --profile``, BENCHMARKS.md "Inference"):

- **Width layout.** Tensors are ``[batch, 1, time, channels]`` and time kernels ``(1, K)``: the
  same memory, but oneDNN's depthwise kernels run 2.5-4.7x faster on it than on ``(K, 1)``
  (1,000 frames, 256-512 channels, K 33-63, AMD EPYC Zen 5), and the results are identical.
- **BatchNorm folded** into the preceding convolution (``kernel * scale``, bias
  ``beta - mean * scale``), so every BN becomes a bias that Grappler fuses into the
  convolution together with the ReLU (and the residual add).
- **One mask per time convolution.** NeMo masks before every convolution; a 1x1 convolution
  (pointwise, residual, the last blocks) only mixes channels within a frame, so padded frames
  cannot leak through it into valid ones. Only convolutions with a time kernel (padding > 0)
  need zeros past each length. Outputs at padded frames differ from the Keras model's and are
  meaningless in both (``logprob_lengths`` says where they start).

The variables are copies made when the module is built (folded weights cannot share the
Keras variables); build a new one after changing the model's weights. Models the rewrite does
not know (tfmot-wrapped layers of ``qn optimize``, unknown layers) are refused by
:func:`unsupported_reason`, and callers keep the Keras graph for them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from qn_keras.choices import HEAD_LAYER
from qn_keras.quartznet_backbone import same_padding, scale_kernel_size

# XNNPACK's depthwise convolutions are fast up to 25 taps (see _split_depthwise).
XNNPACK_MAX_TAPS = 25
# bfloat16: weights stored and convolutions run in bfloat16 (oneDNN's AVX512-BF16 / AMX
# kernels), log-softmax in float32; see bfloat16_supported().
COMPUTE_DTYPES = ("float32", "bfloat16")

_KNOWN_LAYERS = (
    tf.keras.layers.InputLayer,
    tf.keras.layers.Reshape,
    tf.keras.layers.ZeroPadding2D,
    tf.keras.layers.DepthwiseConv2D,
    tf.keras.layers.Conv2D,
    tf.keras.layers.BatchNormalization,
    tf.keras.layers.Activation,
    tf.keras.layers.Dropout,
    tf.keras.layers.Add,
    tf.keras.layers.Dense,
)
_KNOWN_CUSTOM = ("SequenceMask", "ConvLengths", "ChannelShuffle", "SqueezeExcite", "LogSoftmax")


def unsupported_reason(model) -> str | None:
    """Why :class:`InferenceEncoder` cannot rewrite ``model``, or None if it can."""
    if not hasattr(model, "block_args") or not hasattr(model, "kernel_size_factor"):
        return f"{type(model).__name__} is not a QuartzNetCTC model"
    if model.dtype_policy.compute_dtype != "float32":
        return f"compute dtype {model.dtype_policy.compute_dtype} (the rewrite is float32)"
    for layer in model.layers:
        if type(layer).__name__ in _KNOWN_CUSTOM:
            continue
        if type(layer) not in _KNOWN_LAYERS:
            return f"layer {layer.name!r} ({type(layer).__name__}) is not rewritable"
    return None


def _activation(name: str):
    return tf.nn.relu if name == "relu" else tf.nn.silu


def folded_conv_weights(kernel: np.ndarray, bn, bias=0.0, depthwise: bool = False):
    """``(kernel, bias)`` of one convolution equal to ``conv(x, kernel) + bias`` followed by
    ``bn`` in inference mode: ``kernel * s`` and ``beta + (bias - mean) * s`` with
    ``s = gamma / sqrt(var + eps)`` per output channel (the last axis; a depthwise kernel
    ``[kh, kw, C, M]`` has output channel ``c * M + m``). Computed in float64, rounded once."""
    gamma = bn.gamma.numpy() if bn.gamma is not None else 1.0
    beta = bn.beta.numpy() if bn.beta is not None else 0.0
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    scale = np.asarray(gamma, np.float64) / np.sqrt(var.astype(np.float64) + bn.epsilon)
    wide = kernel.astype(np.float64)
    if depthwise:
        folded = (wide.reshape(*kernel.shape[:2], -1) * scale).reshape(kernel.shape)
    else:
        folded = wide * scale
    folded_bias = np.asarray(beta, np.float64) + (np.asarray(bias, np.float64) - mean) * scale
    return folded.astype(kernel.dtype), folded_bias.astype(kernel.dtype)


def _to_width(kernel: np.ndarray) -> np.ndarray:
    """A height-1 ``(K, 1, ...)`` kernel as the equivalent width-1 ``(1, K, ...)`` one."""
    return np.swapaxes(kernel, 0, 1)


class _Conv:
    """One convolution of the rewritten graph: optional time kernel with explicit padding,
    folded BN bias, optional channel shuffle."""

    def __init__(self, module, name, kernel, bias, *, stride, dilation, padding, groups):
        dtype = module.compute_dtype
        self.kernel = tf.Variable(tf.cast(kernel, dtype), trainable=False, name=f"{name}_kernel")
        self.bias = (
            None
            if bias is None
            else tf.Variable(tf.cast(bias, dtype), trainable=False, name=f"{name}_b")
        )
        module._variables.extend(v for v in (self.kernel, self.bias) if v is not None)
        self.stride, self.dilation, self.padding, self.groups = stride, dilation, padding, groups

    def pointwise(self, x):
        return self.add_bias(tf.nn.conv2d(x, self.kernel, 1, "VALID"))

    def add_bias(self, y):
        if self.bias is None:
            return y
        if self.groups and self.groups > 1:
            # A plain add: Grappler would fuse BiasAdd into the convolution, and TensorFlow's
            # own (non-oneDNN) fused convolution has no grouped version.
            return y + self.bias
        return tf.nn.bias_add(y, self.bias)


class InferenceEncoder(tf.Module):
    """Features and lengths to log-probs and lengths, equal on valid frames to ``model``.

    Inputs and outputs as :class:`~qn_keras.quartznet_ctc.QuartzNetCTC`: ``features`` float32
    ``[batch, time, num_features]``, ``lengths`` int32 ``[batch]`` in; ``logprobs`` float32
    ``[batch, frames, vocabulary]`` and ``logprob_lengths`` int32 out.

    Example:
        >>> encoder = InferenceEncoder(build_model("quartznet_5x5"))  # doctest: +SKIP
        >>> logprobs, lengths = encoder(features, feature_lengths)  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        *,
        max_taps: int | None = None,
        masks: bool = True,
        compute_dtype: str = "float32",
        name=None,
    ):
        super().__init__(name=name)
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}: {compute_dtype!r}")
        self.max_taps = max_taps
        self.masks = masks
        self.compute_dtype = tf.as_dtype(compute_dtype)
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"InferenceEncoder cannot rewrite this model: {reason}.")
        self._variables: list[tf.Variable] = []
        self.num_features = int(model.num_features)
        self.activation = model.activation
        blocks = model.block_args
        self.blocks = []
        layers = {layer.name: layer for layer in model.layers}
        for i in range(len(blocks["stackwise_filters"])):
            cfg = {name[len("stackwise_") :]: values[i] for name, values in blocks.items()}
            kernel_size = scale_kernel_size(cfg["kernel_sizes"], model.kernel_size_factor)
            subs = []
            for j in range(cfg["repeats"]):
                subs.append(self._sub_block(layers, i, j, cfg, kernel_size))
            residuals = []
            if cfg["residual"]:
                p = 0
                while f"block_{i}_res_{p}_conv" in layers:
                    conv = layers[f"block_{i}_res_{p}_conv"]
                    kernel, bias = folded_conv_weights(
                        conv.kernel.numpy(), layers[f"block_{i}_res_{p}_bn"]
                    )
                    residuals.append(
                        _Conv(
                            self,
                            f"block_{i}_res_{p}",
                            kernel,
                            bias,
                            stride=cfg["strides"],
                            dilation=1,
                            padding=None,
                            groups=1,
                        )
                    )
                    p += 1
            se = layers.get(f"block_{i}_se")
            if se is not None:
                se = (self._copy(se.squeeze.kernel), self._copy(se.excite.kernel))
            self.blocks.append((cfg, subs, residuals, se))
        head = layers[HEAD_LAYER]
        self.head_kernel = self._copy(head.kernel, head.kernel.numpy()[None, None])
        self.head_bias = self._copy(head.bias)

    def _copy(self, variable, value=None) -> tf.Variable:
        value = tf.cast(variable.numpy() if value is None else value, self.compute_dtype)
        copy = tf.Variable(value, trainable=False, name=variable.name.split(":")[0])
        self._variables.append(copy)
        return copy

    def _sub_block(self, layers, i, j, cfg, kernel_size):
        prefix = f"block_{i}_sub_{j}"
        stride = cfg["strides"] if j == cfg["repeats"] - 1 else 1
        dilation = cfg["dilations"]
        pad = same_padding(kernel_size, stride, dilation)
        padding = tuple(layers[f"{prefix}_pad"].padding[0]) if pad else None
        bn = layers[f"{prefix}_bn"]
        shuffle = layers.get(f"{prefix}_shuffle")
        groups = cfg["groups"]
        if cfg["separable"]:
            depthwise = layers[f"{prefix}_depthwise"]
            time_kernel = _Conv(
                self,
                f"{prefix}_depthwise",
                _to_width(depthwise.depthwise_kernel.numpy()),
                None,
                stride=stride,
                dilation=dilation,
                padding=padding,
                groups=None,
            )
            kernel, bias = folded_conv_weights(layers[f"{prefix}_pointwise"].kernel.numpy(), bn)
            mix = _Conv(
                self, prefix, kernel, bias, stride=1, dilation=1, padding=None, groups=groups
            )
            return time_kernel, mix, shuffle
        kernel, bias = folded_conv_weights(_to_width(layers[f"{prefix}_conv"].kernel.numpy()), bn)
        conv = _Conv(
            self,
            prefix,
            kernel,
            bias,
            stride=stride,
            dilation=dilation,
            padding=padding,
            groups=groups,
        )
        return None, conv, shuffle

    # ------------------------------------------------------------------------------ graph

    @staticmethod
    def _masked(x, lengths):
        mask = tf.sequence_mask(lengths, maxlen=tf.shape(x)[2], dtype=x.dtype)
        return x * mask[:, None, :, None]

    @staticmethod
    def _lengths(lengths, kernel, stride, dilation, pad):
        """:class:`~qn_keras.layers.ConvLengths`' formula (torch's truncating division)."""
        span = 2 * pad - dilation * (kernel - 1) - 1
        if stride == 1 and span == -1:
            return lengths
        return tf.truncatediv(lengths + span, stride) + 1

    def _time_conv(self, conv: _Conv, x, lengths, *, depthwise: bool):
        """Mask, pad and convolve along time; returns the output and its lengths."""
        kernel_size = int(conv.kernel.shape[1])
        pad = 0
        if conv.padding is not None:
            left, right = conv.padding
            pad = (left + right) // 2
            if self.masks:
                x = self._masked(x, lengths)
            x = tf.pad(x, [[0, 0], [0, 0], [left, right], [0, 0]])
        # Height is 1, so striding it too changes nothing; TensorFlow's own (non-oneDNN)
        # depthwise kernel accepts only equal strides.
        strides = [1, conv.stride, conv.stride, 1]
        if depthwise and self.max_taps and (kernel_size > self.max_taps or conv.dilation > 1):
            y = self._split_depthwise(conv, x)
        elif depthwise:
            y = tf.nn.depthwise_conv2d(
                x, conv.kernel, strides, "VALID", dilations=[1, conv.dilation]
            )
        else:
            y = tf.nn.conv2d(x, conv.kernel, strides, "VALID", dilations=[1, 1, conv.dilation, 1])
            y = conv.add_bias(y)
        return y, self._lengths(lengths, kernel_size, conv.stride, conv.dilation, pad)

    def _split_depthwise(self, conv: _Conv, x):
        """A long or dilated depthwise kernel as a sum of undilated convolutions of at most
        ``max_taps`` taps over shifted views of the (padded) input, for TFLite: XNNPACK's
        depthwise kernels handle up to 25 taps in one pass and fall back to a path about 10x
        slower beyond (TFLite in TensorFlow 2.15 and LiteRT 2.3, measured), while QuartzNet's
        kernels are 33-87 taps long; and a dilated convolution becomes space_to_batch with
        paddings computed at run time (shapes TFLite cannot plan), so dilation is spelled out
        as zeros between the taps instead.

        Piece ``[a, a + k)`` of the ``K`` taps reads ``x[a : len - (K - a - k)]``: the same
        output length as the whole kernel, and slice bounds that are constants relative to
        the ends, so TFLite knows every shape when it allocates (no dynamic tensors)."""
        kernel = conv.kernel
        if conv.dilation > 1:
            # The taps with dilation - 1 zeros after each, the trailing zeros cut: constants
            # once the converter freezes the variables.
            d, taps = conv.dilation, int(kernel.shape[1])
            zeros = tf.zeros([1, taps, d - 1, *kernel.shape[2:]], kernel.dtype)
            interleaved = tf.concat([kernel[:, :, None], zeros], axis=2)
            kernel = tf.reshape(interleaved, [1, taps * d, *kernel.shape[2:]])[
                :, : d * (taps - 1) + 1
            ]
        kernel_size = int(kernel.shape[1])
        strides = [1, conv.stride, conv.stride, 1]
        pieces = []
        for start in range(0, kernel_size, self.max_taps):
            taps = min(self.max_taps, kernel_size - start)
            tail = kernel_size - start - taps
            view = x[:, :, start : (-tail if tail else None)]
            piece = kernel[:, start : start + taps]
            pieces.append(tf.nn.depthwise_conv2d(view, piece, strides, "VALID"))
        # Pairwise adds, not add_n: XNNPACK takes ADD but not ADD_N, and every op it does not
        # take splits the graph into separately scheduled partitions.
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        return total

    @staticmethod
    def _shuffle(shuffle, x):
        if shuffle is None:
            return x
        # [B, 1, T, C] and [B, T, 1, C] share one memory layout: reshapes, not transposes.
        shape = tf.shape(x)
        y = shuffle(tf.reshape(x, [shape[0], shape[2], 1, x.shape[-1]]))
        return tf.reshape(y, shape)

    def _squeeze_excite(self, se, x, lengths, act):
        """:class:`~qn_keras.layers.SqueezeExcite`: channel scales from the mean over the valid
        frames (all frames when the caller passes only valid ones, ``masks=False``)."""
        squeeze, excite = se
        if self.masks:
            mask = tf.sequence_mask(lengths, maxlen=tf.shape(x)[2], dtype=x.dtype)
            count = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)
            pooled = tf.reduce_sum(x[:, 0] * mask[:, :, None], axis=1) / count
        else:
            pooled = tf.reduce_mean(x[:, 0], axis=1)
        scale = tf.sigmoid(tf.matmul(act(tf.matmul(pooled, squeeze)), excite))
        return x * scale[:, None, None, :]

    def __call__(self, features, lengths):
        logits, logit_lengths = self.logits(features, lengths)
        return tf.nn.log_softmax(logits, axis=-1), logit_lengths

    def logits(self, features, lengths):
        """The CTC head's logits (before log-softmax) and their lengths."""
        act = _activation(self.activation)
        lengths = tf.cast(lengths, tf.int32)
        # expand_dims / squeeze rather than reshapes to computed shapes: TFLite then knows
        # every shape when it allocates, which XNNPACK needs to take the graph.
        x = tf.expand_dims(tf.cast(features, self.compute_dtype), 1)
        dense = [(x, lengths)]
        for cfg, subs, residuals, se in self.blocks:
            block_input, block_lengths = dense[-1]
            y, y_lengths = block_input, block_lengths
            for j, (time_kernel, mix, shuffle) in enumerate(subs):
                if time_kernel is not None:
                    y, y_lengths = self._time_conv(time_kernel, y, y_lengths, depthwise=True)
                    y = mix.pointwise(y)
                else:
                    y, y_lengths = self._time_conv(mix, y, y_lengths, depthwise=False)
                y = self._shuffle(shuffle, y)
                if j < len(subs) - 1:
                    y = act(y)
            if se is not None:
                y = self._squeeze_excite(se, y, y_lengths, act)
            sources = [s for s, _ in dense] if cfg["residual_dense"] else [block_input]
            for res, source in zip(residuals, sources if residuals else [], strict=True):
                if res.stride > 1:
                    source = source[:, :, :: res.stride]
                y = y + res.pointwise(source)
            y = act(y)
            if cfg["residual"] and cfg["residual_dense"]:
                dense = dense + [(y, y_lengths)]
            else:
                dense = [(y, y_lengths)]
        y, y_lengths = dense[-1]
        # The head as a 1x1 convolution with bias, like the other convolutions (TFLite's
        # float16 and integer modes then treat its weights like theirs).
        logits = tf.nn.bias_add(tf.nn.conv2d(y, self.head_kernel, 1, "VALID"), self.head_bias)
        return tf.cast(tf.squeeze(logits, 1), tf.float32), y_lengths


def tflite_encoder(model) -> InferenceEncoder:
    """The rewrite as TFLite graphs use it: utterances of valid frames only (no masks: the
    caller crops padding, which gives the same valid outputs), long depthwise kernels split for
    XNNPACK, and no op whose output shape TFLite would only learn while running (XNNPACK
    leaves such ops, and everything after them, to TFLite's slower built-in kernels)."""
    return InferenceEncoder(model, max_taps=XNNPACK_MAX_TAPS, masks=False)


def bfloat16_supported() -> str | None:
    """None if this process can run bfloat16 convolutions, else why not: they need oneDNN
    (``TF_ENABLE_ONEDNN_OPTS`` not 0) and a CPU with AVX512-BF16 or AMX (oneDNN finds no
    kernel on AVX2 CPUs, or under ``ONEDNN_MAX_CPU_ISA=AVX2``)."""
    x = tf.ones([1, 1, 8, 4], tf.bfloat16)
    try:
        tf.nn.depthwise_conv2d(x, tf.ones([1, 3, 4, 1], tf.bfloat16), [1, 1, 1, 1], "VALID")
        tf.nn.conv2d(x, tf.ones([1, 1, 4, 4], tf.bfloat16), 1, "VALID").numpy()
    except (tf.errors.OpError, NotImplementedError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        return (
            "bfloat16 inference needs oneDNN (TF_ENABLE_ONEDNN_OPTS unset or 1) and a CPU with "
            f"AVX512-BF16 or AMX; this one cannot run it ({first_line})"
        )
    return None
