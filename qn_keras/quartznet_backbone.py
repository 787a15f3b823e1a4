"""QuartzNet / Jasper encoder as a flat Keras Functional graph that mirrors NeMo's block list."""

from __future__ import annotations

import tensorflow as tf

from qn_keras.layers import ChannelShuffle, ConvLengths, SequenceMask, SqueezeExcite

STACKWISE_ARGS = (
    "stackwise_filters",
    "stackwise_kernel_sizes",
    "stackwise_strides",
    "stackwise_dilations",
    "stackwise_repeats",
    "stackwise_residual",
    "stackwise_separable",
    "stackwise_groups",
    "stackwise_dropout",
    "stackwise_residual_dense",
    "stackwise_se",
)
ACTIVATIONS = ("relu", "swish")


def scale_kernel_size(kernel_size: int, factor: float) -> int:
    """NeMo's ``compute_new_kernel_size``: scale, then round up to the next odd size."""
    if factor == 1.0 or kernel_size == 1:
        return kernel_size
    new = max(int(kernel_size * factor), 1)
    return new + 1 if new % 2 == 0 else new


def output_stride(block_args: dict) -> int:
    """Feature frames per output frame: the product of the blocks' strides (2 for QuartzNet,
    4 for the ContextNet preset)."""
    stride = 1
    for s in block_args.get("stackwise_strides", ()):
        stride *= int(s)
    return stride


def same_padding(kernel_size: int, stride: int, dilation: int) -> int:
    """NeMo's ``get_same_padding``: symmetric ``dilation * (k - 1) // 2`` on each side."""
    if stride > 1 and dilation > 1:
        raise ValueError("A block cannot combine stride > 1 with dilation > 1 (NeMo forbids it).")
    return dilation * (kernel_size - 1) // 2


def lookahead_padding(blocks: dict, kernel_size_factor: float, lookahead: int | None) -> dict:
    """Right ("future") padding of each time convolution, ``{(block, sub_block): frames}``, for
    a model that may look ``lookahead`` feature frames (10 ms) ahead in all; ``None`` means
    NeMo's symmetric padding (full context, not streamable with state).

    The budget is dealt one frame at a time, round-robin from the first convolution, to the
    convolutions that still have symmetric room; a frame of a convolution after a stride-2
    block costs 2 feature frames. The left padding takes the rest, so every convolution keeps
    its kernel and output length and each output sees mostly the past (the streaming
    option of issue 15: with state, chunked inference then equals offline inference).
    """
    if lookahead is None:
        return {}
    lookahead = int(lookahead)
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0 feature frames or None. Received: {lookahead}")
    if any(blocks["stackwise_se"]):
        raise ValueError(
            "lookahead cannot be combined with squeeze-and-excitation (stackwise_se): its "
            "global average sees the whole utterance."
        )
    convs = []  # (key, room, cost in feature frames per frame of right padding)
    rate = 1
    for i, kernel in enumerate(blocks["stackwise_kernel_sizes"]):
        kernel = scale_kernel_size(kernel, kernel_size_factor)
        repeats = blocks["stackwise_repeats"][i]
        for j in range(repeats):
            pad = same_padding(kernel, 1, blocks["stackwise_dilations"][i])
            if pad:
                convs.append(((i, j), pad, rate))
            if j == repeats - 1:
                rate *= blocks["stackwise_strides"][i]
    right = {key: 0 for key, _, _ in convs}
    budget = lookahead
    progress = True
    while progress:
        progress = False
        for key, room, cost in convs:
            if right[key] < room and cost <= budget:
                right[key] += 1
                budget -= cost
                progress = True
    return right


def total_lookahead(blocks: dict, kernel_size_factor: float, lookahead: int | None) -> int:
    """Feature frames the encoder looks ahead with :func:`lookahead_padding`'s padding."""
    right = lookahead_padding(blocks, kernel_size_factor, lookahead)
    total, rate = 0, 1
    for i, repeats in enumerate(blocks["stackwise_repeats"]):
        for j in range(repeats):
            total += right.get((i, j), 0) * rate
        rate *= blocks["stackwise_strides"][i]
    return total


def normalize_block_lists(**stackwise) -> dict:
    """Checks the per-block lists and fills optional ones with NeMo's defaults."""
    filters = stackwise.get("stackwise_filters")
    if not filters:
        raise ValueError(f"stackwise_filters must be a non-empty list. Received: {filters!r}")
    num_blocks = len(filters)
    defaults = {
        "stackwise_strides": 1,
        "stackwise_dilations": 1,
        "stackwise_repeats": 1,
        "stackwise_residual": False,
        "stackwise_separable": True,
        "stackwise_groups": 1,
        "stackwise_dropout": 0.0,
        "stackwise_residual_dense": False,
        "stackwise_se": False,
    }
    out = {}
    for name in STACKWISE_ARGS:
        value = stackwise.get(name)
        if value is None:
            if name not in defaults:
                raise ValueError(f"{name} is required.")
            value = [defaults[name]] * num_blocks
        value = list(value)
        if len(value) != num_blocks:
            lengths = {n: len(stackwise[n]) for n in STACKWISE_ARGS if stackwise.get(n) is not None}
            raise ValueError(
                f"All stackwise_* lists must have one entry per block ({num_blocks} blocks from "
                f"stackwise_filters); {name} has {len(value)}. Received lengths: {lengths}"
            )
        out[name] = value
    for i in range(num_blocks):
        groups = out["stackwise_groups"][i]
        if out["stackwise_filters"][i] % groups:
            raise ValueError(
                f"Block {i}: filters ({out['stackwise_filters'][i]}) must be divisible by groups "
                f"({groups})."
            )
        if out["stackwise_repeats"][i] < 1:
            raise ValueError(
                f"Block {i}: repeats must be >= 1. Received: {out['stackwise_repeats'][i]}"
            )
        kernel = out["stackwise_kernel_sizes"][i]
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(
                f"Block {i}: kernel sizes must be odd (symmetric 'same' padding, as NeMo). "
                f"Received: {kernel}"
            )
        same_padding(
            kernel,
            out["stackwise_strides"][i],
            out["stackwise_dilations"][i],
        )
    return out


def build_encoder_graph(
    features,
    lengths,
    *,
    num_features: int,
    activation: str = "relu",
    kernel_size_factor: float = 1.0,
    se_reduction_ratio: int = 8,
    lookahead: int | None = None,
    **stackwise,
):
    """Builds the encoder on Keras symbolic inputs; returns ``(encoded, encoded_lengths)``.

    ``features`` ``[batch, time, num_features]``, ``lengths`` int32 ``[batch]``. The encoder runs
    on ``[batch, time, 1, channels]`` so every time convolution is a height-1 ``Conv2D`` or
    ``DepthwiseConv2D``, which tfmot can quantize. Layer names follow NeMo's module indices
    (``block_{i}_sub_{j}_...``, ``block_{i}_res_{p}_...``) so checkpoint conversion is a table.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}. Received: {activation!r}")
    blocks = normalize_block_lists(**stackwise)
    right_padding = lookahead_padding(blocks, kernel_size_factor, lookahead)
    x = tf.keras.layers.Reshape((-1, 1, num_features), name="to_height1")(features)
    # NeMo's `xs`: the encoder input plus each dense-residual block's output.
    dense_inputs = [x]
    channels_in = num_features
    residual_panes: list[int] = []
    for i in range(len(blocks["stackwise_filters"])):
        cfg = {name[len("stackwise_") :]: values[i] for name, values in blocks.items()}
        if cfg["residual_dense"]:
            residual_panes.append(channels_in)
            panes = list(residual_panes)
        else:
            panes = []
        block_input = dense_inputs[-1]
        block_lengths = lengths
        kernel = scale_kernel_size(cfg["kernel_sizes"], kernel_size_factor)
        out, lengths = _main_branch(
            block_input,
            lengths,
            i,
            cfg,
            kernel,
            activation,
            se_reduction_ratio,
            [right_padding.get((i, j)) for j in range(cfg["repeats"])],
        )
        if cfg["residual"]:
            sources = dense_inputs if panes else [block_input]
            for p, source in enumerate(sources):
                res = SequenceMask(name=f"block_{i}_res_{p}_mask")([source, block_lengths])
                res = tf.keras.layers.Conv2D(
                    cfg["filters"],
                    1,
                    strides=(cfg["strides"], cfg["strides"]),
                    use_bias=False,
                    kernel_initializer="glorot_uniform",
                    name=f"block_{i}_res_{p}_conv",
                )(res)
                res = _batch_norm(f"block_{i}_res_{p}_bn")(res)
                out = tf.keras.layers.Add(name=f"block_{i}_res_{p}_add")([out, res])
        out = tf.keras.layers.Activation(activation, name=f"block_{i}_out_act")(out)
        if cfg["dropout"]:
            out = tf.keras.layers.Dropout(cfg["dropout"], name=f"block_{i}_out_dropout")(out)
        dense_inputs = dense_inputs + [out] if (cfg["residual"] and panes) else [out]
        channels_in = cfg["filters"]
    encoded = tf.keras.layers.Reshape((-1, channels_in), name="from_height1")(dense_inputs[-1])
    return encoded, lengths


def _batch_norm(name):
    # NeMo: BatchNorm1d(eps=1e-3, momentum=0.1); Keras momentum is 1 - torch momentum.
    return tf.keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.9, name=name)


def _main_branch(x, lengths, i, cfg, kernel, activation, se_reduction_ratio, right_padding):
    """R sub-blocks: [mask, pad, (depthwise, mask,) pointwise/conv, BN, shuffle], act between.
    ``right_padding[j]``: sub-block j's future padding, None for symmetric."""
    for j in range(cfg["repeats"]):
        prefix = f"block_{i}_sub_{j}"
        # NeMo's `stride_last`: a strided block strides only its last sub-block (ContextNet
        # configs); QuartzNet's and Jasper's strided blocks have one sub-block, so it's moot.
        stride = cfg["strides"] if j == cfg["repeats"] - 1 else 1
        dilation = cfg["dilations"]
        pad = same_padding(kernel, stride, dilation)
        x = SequenceMask(name=f"{prefix}_mask")([x, lengths])
        if pad:
            # Asymmetric padding keeps the total (so kernel and lengths are unchanged).
            right = pad if right_padding[j] is None else right_padding[j]
            x = tf.keras.layers.ZeroPadding2D(
                ((2 * pad - right, right), (0, 0)), name=f"{prefix}_pad"
            )(x)
        if cfg["separable"]:
            x = tf.keras.layers.DepthwiseConv2D(
                (kernel, 1),
                strides=(stride, stride),  # width is 1: equal strides are a no-op there
                dilation_rate=(dilation, 1),
                padding="valid",
                use_bias=False,
                depthwise_initializer="glorot_uniform",
                name=f"{prefix}_depthwise",
            )(x)
            lengths = ConvLengths(kernel, stride, dilation, pad, name=f"{prefix}_lengths")(lengths)
            x = SequenceMask(name=f"{prefix}_pw_mask")([x, lengths])
            x = tf.keras.layers.Conv2D(
                cfg["filters"],
                1,
                groups=cfg["groups"],
                use_bias=False,
                kernel_initializer="glorot_uniform",
                name=f"{prefix}_pointwise",
            )(x)
        else:
            x = tf.keras.layers.Conv2D(
                cfg["filters"],
                (kernel, 1),
                strides=(stride, stride),  # width is 1: equal strides are a no-op there
                dilation_rate=(dilation, 1),
                groups=cfg["groups"],
                padding="valid",
                use_bias=False,
                kernel_initializer="glorot_uniform",
                name=f"{prefix}_conv",
            )(x)
            lengths = ConvLengths(kernel, stride, dilation, pad, name=f"{prefix}_lengths")(lengths)
        x = _batch_norm(f"{prefix}_bn")(x)
        if cfg["groups"] > 1:
            x = ChannelShuffle(cfg["groups"], name=f"{prefix}_shuffle")(x)
        if j < cfg["repeats"] - 1:
            x = tf.keras.layers.Activation(activation, name=f"{prefix}_act")(x)
            if cfg["dropout"]:
                x = tf.keras.layers.Dropout(cfg["dropout"], name=f"{prefix}_dropout")(x)
    if cfg["se"]:
        x = SqueezeExcite(cfg["filters"], se_reduction_ratio, activation, name=f"block_{i}_se")(
            [x, lengths]
        )
    return x, lengths


def encoder_inputs(num_features: int):
    features = tf.keras.Input(shape=(None, num_features), dtype="float32", name="features")
    lengths = tf.keras.Input(shape=(), dtype="int32", name="feature_lengths")
    return features, lengths


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class QuartzNetBackbone(tf.keras.Model):
    """QuartzNet / Jasper encoder: log-mel features and lengths to encodings and lengths.

    Each position of the ``stackwise_*`` lists is one NeMo ``JasperBlock`` (C1, B-blocks, C2,
    C3), so a NeMo encoder config maps onto the lists one to one. A separable sub-block is
    depthwise conv -> pointwise conv (optionally grouped) -> BatchNorm -> channel shuffle (if
    grouped); sub-blocks but the last are followed by activation and dropout; the residual
    branch (1x1 conv + BN on the block input) is added before the block's final activation.
    Padded frames are zeroed before every convolution and lengths carried through, so valid
    outputs do not depend on batch padding. A strided block with repeats strides its last
    sub-block and its residual branch (NeMo's ``stride_last`` with ``residual_mode: stride_add``).

    Inputs: ``features`` float32 ``[batch, time, num_features]``, ``feature_lengths`` int32
    ``[batch]``. Outputs: ``encoded`` ``[batch, ceil(time / 2), filters[-1]]`` (for one
    stride-2 block) and ``encoded_lengths`` int32 ``[batch]``.

    Args:
        stackwise_filters, stackwise_kernel_sizes: per-block output channels and kernel sizes.
        stackwise_strides, stackwise_dilations, stackwise_repeats, stackwise_residual,
        stackwise_separable, stackwise_groups, stackwise_dropout, stackwise_residual_dense,
        stackwise_se: optional per-block lists (defaults 1, 1, 1, False, True, 1, 0.0, False,
            False).
        num_features: mel bins of the input (64).
        activation: "relu" (QuartzNet) or "swish" (ContextNet style).
        kernel_size_factor: scales every kernel, rounded to odd sizes.
        se_reduction_ratio: squeeze-and-excitation bottleneck ratio.
        lookahead: feature frames (10 ms) the encoder may see ahead in all, for stateful
            streaming (:func:`lookahead_padding`); None (default): NeMo's symmetric padding.

    Example:
        >>> backbone = QuartzNetBackbone(stackwise_filters=[32, 32],
        ...     stackwise_kernel_sizes=[5, 3], stackwise_strides=[2, 1])
        >>> enc, lens = backbone([tf.zeros([1, 10, 64]), tf.constant([10])])
        >>> enc.shape, int(lens[0])
        (TensorShape([1, 5, 32]), 5)

    Reference: QuartzNet, arXiv:1910.10261; Jasper, arXiv:1904.03288.
    """

    def __init__(
        self,
        stackwise_filters,
        stackwise_kernel_sizes,
        stackwise_strides=None,
        stackwise_dilations=None,
        stackwise_repeats=None,
        stackwise_residual=None,
        stackwise_separable=None,
        stackwise_groups=None,
        stackwise_dropout=None,
        stackwise_residual_dense=None,
        stackwise_se=None,
        num_features=64,
        activation="relu",
        kernel_size_factor=1.0,
        se_reduction_ratio=8,
        lookahead=None,
        **kwargs,
    ):
        block_args = normalize_block_lists(
            stackwise_filters=stackwise_filters,
            stackwise_kernel_sizes=stackwise_kernel_sizes,
            stackwise_strides=stackwise_strides,
            stackwise_dilations=stackwise_dilations,
            stackwise_repeats=stackwise_repeats,
            stackwise_residual=stackwise_residual,
            stackwise_separable=stackwise_separable,
            stackwise_groups=stackwise_groups,
            stackwise_dropout=stackwise_dropout,
            stackwise_residual_dense=stackwise_residual_dense,
            stackwise_se=stackwise_se,
        )
        features, lengths = encoder_inputs(num_features)
        encoded, encoded_lengths = build_encoder_graph(
            features,
            lengths,
            num_features=num_features,
            activation=activation,
            kernel_size_factor=kernel_size_factor,
            se_reduction_ratio=se_reduction_ratio,
            lookahead=lookahead,
            **block_args,
        )
        super().__init__(inputs=[features, lengths], outputs=[encoded, encoded_lengths], **kwargs)
        self.block_args = block_args
        self.num_features = num_features
        self.activation = activation
        self.kernel_size_factor = kernel_size_factor
        self.se_reduction_ratio = se_reduction_ratio
        self.lookahead = lookahead

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            **self.block_args,
            "num_features": self.num_features,
            "activation": self.activation,
            "kernel_size_factor": self.kernel_size_factor,
            "se_reduction_ratio": self.se_reduction_ratio,
            "lookahead": self.lookahead,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)
