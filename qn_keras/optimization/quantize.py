"""Quantization-aware training of QuartzNet models with tensorflow-model-optimization (tfmot).

The encoder's time convolutions are height-1 ``Conv2D`` / ``DepthwiseConv2D``, which tfmot's
default 8-bit scheme quantizes and the TFLite converter turns into int8 kernels. This module
adds what the default scheme lacks for this model family:

* ``QuantizeConfig``s for the project's own layers (masks, lengths, channel shuffle,
  log-softmax, squeeze-excite) and for the int32 ``logprob_lengths`` output;
* no fake quantization on int32 inputs (the default scheme would quantize ``feature_lengths``);
* per-channel scales for depthwise kernels (tfmot's default quantizes a ``[K, 1, C, 1]``
  depthwise kernel "per axis" over its last axis, which has size 1: per tensor in effect);
* per-tensor 8-bit weights, and 4-bit per-channel weights with the first block and the CTC
  head kept at 8 bit.

BatchNormalization is folded into the preceding convolution before quantization (see
:func:`~qn_keras.optimization.graph.fold_batchnorm` for why tfmot's own Conv+BN handling is not
used), and a ReLU after a convolution or a residual Add is fused as TFLite fuses it.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import (
    quantize_layer,
    quantize_wrapper,
    quantizers,
)
from tensorflow_model_optimization.python.core.quantization.keras import utils as quantize_utils
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_configs as configs8,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_layout_transform as layout8,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry as registry8,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_transforms as transforms8,
)
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
    model_transformer,
    transforms,
)
from tensorflow_model_optimization.python.core.quantization.keras.quantize_aware_activation import (
    NoOpActivation,
)

from qn_keras import layers as qn_layers
from qn_keras.choices import HEAD_LAYER, QAT_SCHEMES
from qn_keras.optimization.graph import conv_head, fold_batchnorm

tfq = tfmot.quantization.keras


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized; activations are always 8-bit (asymmetric, per tensor).

    Attributes:
        name: the scheme's name (``SCHEMES`` key).
        weight_bits: bits of the convolution weights (symmetric, narrow range).
        per_channel: one scale per output channel (True) or one per tensor.
        edge_bits: bits of the first block's convolutions and the CTC head (None: weight_bits).
    """

    name: str
    weight_bits: int
    per_channel: bool
    edge_bits: int | None = None

    def bits_for(self, layer_name: str) -> int:
        """Weight bits of the layer called ``layer_name`` (first block and head: edge_bits)."""
        if self.edge_bits is not None and is_edge_layer(layer_name):
            return self.edge_bits
        return self.weight_bits


SCHEMES = {
    "int8_per_channel": QuantScheme("int8_per_channel", 8, True),
    "int8_per_tensor": QuantScheme("int8_per_tensor", 8, False),
    "int4_per_channel": QuantScheme("int4_per_channel", 4, True, edge_bits=8),
}
assert tuple(SCHEMES) == QAT_SCHEMES  # the names users choose from
ACTIVATION_BITS = 8
FIRST_BLOCK_PREFIX = "block_0_"


def get_scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        raise ValueError(f"Unknown quantization scheme {name!r}. Known: {', '.join(SCHEMES)}.")
    return SCHEMES[name]


def is_edge_layer(layer_name: str) -> bool:
    """The first block (C1) and the CTC head: the layers 4-bit schemes keep at 8 bit."""
    name = layer_name.removeprefix("quant_")
    return name.startswith(FIRST_BLOCK_PREFIX) or name == HEAD_LAYER


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class KernelQuantizer(quantizers.LastValueQuantizer):
    """Symmetric narrow-range weight quantizer: per tensor, or per output channel.

    For a depthwise kernel ``[kh, kw, C, M]`` the per-channel scales run over the ``C * M``
    output channels, the layout of TFLite's per-channel DEPTHWISE_CONV_2D weights (tfmot's own
    per-axis quantizer would use the size-1 last axis: one scale for the whole kernel). With
    ``preserve_sparsity`` the kernel is multiplied by a stored 0/1 mask (set from the weights by
    :func:`init_sparsity_masks`) before quantizing, so pruned weights stay exactly zero while
    quantization-aware training updates the others.
    """

    def __init__(
        self, num_bits=8, per_axis=True, depthwise=False, preserve_sparsity=False, **kwargs
    ):
        super().__init__(num_bits, per_axis, symmetric=True, narrow_range=True)
        self.depthwise = depthwise
        self.preserve_sparsity = preserve_sparsity

    def build(self, tensor_shape, name, layer):
        if self.per_axis and self.depthwise:
            channels = int(tensor_shape[-2]) * int(tensor_shape[-1])
            result = self._add_range_weights(layer, name, True, (channels,))
        else:
            result = super().build(tensor_shape, name, layer)
        if self.preserve_sparsity:
            result["sparsity_mask"] = layer.add_weight(
                f"{name}_sparsity_mask",
                shape=tensor_shape,
                initializer=tf.keras.initializers.Ones(),
                trainable=False,
            )
        return result

    def __call__(self, inputs, training, weights, **kwargs):
        if self.preserve_sparsity:
            inputs = inputs * weights["sparsity_mask"]
        if not (self.per_axis and self.depthwise):
            return super().__call__(inputs, training, weights, **kwargs)
        shape = tf.shape(inputs)
        flat = tf.reshape(inputs, tf.concat([shape[:2], [1, -1]], axis=0))
        flat = super().__call__(flat, training, weights, **kwargs)
        return tf.reshape(flat, shape)

    def get_config(self):
        return {
            "num_bits": self.num_bits,
            "per_axis": self.per_axis,
            "depthwise": self.depthwise,
            "preserve_sparsity": self.preserve_sparsity,
        }

    def __eq__(self, other):
        return isinstance(other, KernelQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class ActivationQuantizer(quantizers.MovingAverageQuantizer):
    """8-bit asymmetric activation quantizer whose range starts from real data.

    tfmot's ``MovingAverageQuantizer`` starts every range at [-6, 6] and moves it with an
    exponential moving average of decay 0.999, so for the first few hundred steps of a short
    fine-tuning run the activations of a trained model are clipped at 6 (a QuartzNet trained to
    0.4% WER started QAT at 69%). Here the first training batch sets the range, and the moving
    average (decay ``ema_decay``) follows from there.
    """

    def __init__(
        self, num_bits=8, per_axis=False, symmetric=False, narrow_range=False, ema_decay=0.99
    ):
        super().__init__(num_bits, per_axis, symmetric, narrow_range)
        self.ema_decay = ema_decay

    def build(self, tensor_shape, name, layer):
        result = self._add_range_weights(layer, name)
        result["calibrated"] = layer.add_weight(
            f"{name}_calibrated", initializer=tf.keras.initializers.Zeros(), trainable=False
        )
        return result

    def __call__(self, inputs, training, weights, **kwargs):
        min_var, max_var = weights["min_var"], weights["max_var"]
        if training:
            # The range must contain 0 (TFLite's zero point).
            batch_min = tf.minimum(tf.reduce_min(inputs), 0.0)
            batch_max = tf.maximum(tf.reduce_max(inputs), 0.0)
            decay = self.ema_decay * weights["calibrated"]
            new_min = min_var.assign(decay * min_var + (1.0 - decay) * batch_min)
            new_max = max_var.assign(decay * max_var + (1.0 - decay) * batch_max)
            with tf.control_dependencies([new_min, new_max]):
                weights["calibrated"].assign(1.0)
            min_var, max_var = new_min, new_max
        return tf.quantization.fake_quant_with_min_max_vars(
            inputs, min_var, max_var, num_bits=self.num_bits, narrow_range=self.narrow_range
        )

    def get_config(self):
        return {**super().get_config(), "ema_decay": self.ema_decay}

    def __eq__(self, other):
        return isinstance(other, ActivationQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class OutputQuantizeConfig(tfq.QuantizeConfig):
    """Quantizes a layer's output (8-bit, :class:`ActivationQuantizer`): activations, adds."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [ActivationQuantizer(ACTIVATION_BITS)]

    def get_config(self):
        return {}


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class WeightQuantizeConfig(tfq.QuantizeConfig):
    """Quantizes a layer's kernel with :class:`KernelQuantizer` and its output (8-bit).

    Like tfmot's ``Default8BitConvQuantizeConfig``, with the scheme's bit width and scales; the
    output is quantized through the layer's activation (tfmot's ``QuantizeAwareActivation``),
    which is skipped when a transform fused a following ReLU into it.
    """

    def __init__(
        self,
        weight_attr="kernel",
        num_bits=8,
        per_channel=True,
        depthwise=False,
        preserve_sparsity=False,
    ):
        self.weight_attr = weight_attr
        self.num_bits = num_bits
        self.per_channel = per_channel
        self.depthwise = depthwise
        self.preserve_sparsity = preserve_sparsity
        self.weight_quantizer = KernelQuantizer(
            num_bits, per_channel, depthwise=depthwise, preserve_sparsity=preserve_sparsity
        )
        self.activation_quantizer = ActivationQuantizer(ACTIVATION_BITS)

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, self.weight_attr), self.weight_quantizer)]

    def get_activations_and_quantizers(self, layer):
        return [(layer.activation, self.activation_quantizer)]

    def set_quantize_weights(self, layer, quantize_weights):
        setattr(layer, self.weight_attr, quantize_weights[0])

    def set_quantize_activations(self, layer, quantize_activations):
        layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {
            "weight_attr": self.weight_attr,
            "num_bits": self.num_bits,
            "per_channel": self.per_channel,
            "depthwise": self.depthwise,
            "preserve_sparsity": self.preserve_sparsity,
        }


# Layers whose output needs no new quantization range: masking multiplies by 0/1, shuffling
# and reshaping move values, lengths are int32, and log-softmax stays in float32 so the
# logits are dequantized once at the head.
NO_QUANTIZE_LAYERS = (
    qn_layers.SequenceMask,
    qn_layers.ConvLengths,
    qn_layers.ChannelShuffle,
    qn_layers.LogSoftmax,
    qn_layers.SqueezeExcite,
)


class QuartzNetQuantizeRegistry(registry8.Default8BitQuantizeRegistry):
    """tfmot's 8-bit registry, plus the project's layers and the scheme's weight quantizers."""

    def __init__(self, scheme: QuantScheme, preserve_sparsity: bool = False):
        super().__init__()
        self.scheme = scheme
        self.preserve_sparsity = preserve_sparsity

    def supports(self, layer):
        return isinstance(layer, NO_QUANTIZE_LAYERS) or super().supports(layer)

    def get_quantize_config(self, layer):
        if isinstance(layer, NO_QUANTIZE_LAYERS) or _is_int_layer(layer):
            return configs8.NoOpQuantizeConfig()
        kind = type(layer)
        if kind in (tf.keras.layers.DepthwiseConv2D, tf.keras.layers.Conv2D):
            depthwise = kind is tf.keras.layers.DepthwiseConv2D
            return WeightQuantizeConfig(
                "depthwise_kernel" if depthwise else "kernel",
                self.scheme.bits_for(layer.name),
                self.scheme.per_channel,
                depthwise=depthwise,
                preserve_sparsity=self.preserve_sparsity,
            )
        if kind in (tf.keras.layers.Activation, tf.keras.layers.Add):
            return OutputQuantizeConfig()
        return super().get_quantize_config(layer)


def _is_int_layer(layer) -> bool:
    return tf.as_dtype(layer.dtype or "float32").is_integer


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class InputQuantize(quantize_layer.QuantizeLayer):
    """tfmot's ``QuantizeLayer``, marked built after ``build``.

    tfmot's own does not call ``Layer.build``, so loading a ``.keras`` file builds it twice
    (once from its build config, once when the graph is called) and fails on the duplicated
    range variables. :func:`quantize_model` swaps it in for the input ``QuantizeLayer``.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self.built = True


@tf.keras.saving.register_keras_serializable(package="qn_keras")
class SavableQuantizeWrapper(quantize_wrapper.QuantizeWrapperV2):
    """tfmot's ``QuantizeWrapperV2`` whose ``.keras`` state holds each of its variables once.

    tfmot's wrapper lists the wrapped kernel among its own weights (twice once trained), while a
    freshly loaded one lists it once, so ``.keras`` files of quantized models fail to load
    ("expected 6 variables, received 7"). This one saves and loads only its own quantizer
    variables, deduplicated; the wrapped layer's weights are saved with the wrapped layer.
    """

    def _own_variables(self):
        inner = {id(w) for w in self.layer.weights}
        seen, own = set(), []
        for v in self._trainable_weights + self._non_trainable_weights:
            if id(v) not in inner and id(v) not in seen:
                seen.add(id(v))
                own.append(v)
        return own

    def save_own_variables(self, store):
        for i, v in enumerate(self._own_variables()):
            store[f"{i}"] = v.numpy()

    def load_own_variables(self, store):
        own = self._own_variables()
        if len(store.keys()) != len(own):
            raise ValueError(
                f"Layer {self.name!r} expected {len(own)} quantizer variables, but the file "
                f"holds {len(store.keys())}."
            )
        for i, v in enumerate(own):
            v.assign(store[f"{i}"])


class _FloatInputLayerQuantize(transforms8.InputLayerQuantize):
    """Fake-quantizes float inputs only: ``feature_lengths`` is int32 and stays exact."""

    def pattern(self):
        return transforms.LayerPattern("InputLayer", config={"dtype": "float32"})


class _ConvReLUFuse(transforms.Transform):
    """Conv (BN folded) -> ReLU: no fake quantization between them, as TFLite fuses the ReLU.

    tfmot's ``LayerReLUQuantize`` would give the conv a no-op config, which also drops its
    weight quantization; here only the conv's own output quantizer is switched off.
    """

    def pattern(self):
        return transforms.LayerPattern(
            "Activation",
            config={"activation": "relu"},
            inputs=[
                transforms.LayerPattern("Conv2D|DepthwiseConv2D", config={"activation": "linear"})
            ],
        )

    def replacement(self, match_layer):
        conv = match_layer.input_layers[0]
        conv.layer["config"]["activation"] = quantize_utils.serialize_activation(
            NoOpActivation(), use_legacy_format=True
        )
        return match_layer

    def custom_objects(self):
        return {"NoOpActivation": NoOpActivation}


class _AddReLUFuse(transforms8.LayerReluActivationQuantize):
    """Residual Add -> ReLU: the ReLU's output is quantized, not the sum before it."""

    def pattern(self):
        return transforms.LayerPattern(
            "Activation", config={"activation": "relu"}, inputs=[transforms.LayerPattern("Add")]
        )


class QuartzNetLayoutTransform(layout8.Default8BitQuantizeLayoutTransform):
    """Graph transforms for folded-BN QuartzNet graphs: float inputs only, ReLU fusion."""

    def apply(self, model, layer_quantize_map):
        pipeline = [_FloatInputLayerQuantize(), _ConvReLUFuse(), _AddReLUFuse()]
        return model_transformer.ModelTransformer(
            model, pipeline, set(layer_quantize_map), layer_quantize_map
        ).transform()


class QuartzNetQuantizeScheme(tfq.QuantizeScheme):
    def __init__(self, scheme: QuantScheme, preserve_sparsity: bool = False):
        self.scheme = scheme
        self.preserve_sparsity = preserve_sparsity

    def get_layout_transformer(self):
        return QuartzNetLayoutTransform()

    def get_quantize_registry(self):
        return QuartzNetQuantizeRegistry(self.scheme, self.preserve_sparsity)


def custom_objects() -> dict:
    """Objects a quantized model needs to be cloned or loaded (pass to ``quantize_scope``)."""
    return {
        "KernelQuantizer": KernelQuantizer,
        "ActivationQuantizer": ActivationQuantizer,
        "OutputQuantizeConfig": OutputQuantizeConfig,
        "InputQuantize": InputQuantize,
        "SavableQuantizeWrapper": SavableQuantizeWrapper,
        "WeightQuantizeConfig": WeightQuantizeConfig,
        "NoOpQuantizeConfig": configs8.NoOpQuantizeConfig,
        "NoOpActivation": NoOpActivation,
        "Default8BitOutputQuantizeConfig": configs8.Default8BitOutputQuantizeConfig,
        **{name: getattr(qn_layers, name) for name in qn_layers.__all__},
    }


def quantize_scope():
    """``tfmot.quantization.keras.quantize_scope`` with this module's configs and qn_keras layers."""
    return tfq.quantize_scope(custom_objects())


def quantize_model(
    model: tf.keras.Model,
    scheme: str | QuantScheme = "int8_per_channel",
    *,
    preserve_sparsity: bool = False,
) -> tf.keras.Model:
    """A fake-quantized copy of a QuartzNet model for quantization-aware training.

    The copy starts from ``model``'s weights; training it leaves ``model`` unchanged. Its CTC
    head is a 1x1 convolution (:func:`~qn_keras.optimization.graph.conv_head`) and every
    BatchNormalization is folded into the convolution before it
    (:func:`~qn_keras.optimization.graph.fold_batchnorm`), so the fake-quantized weights are
    exactly the integer weights TFLite will store. Every layer is annotated and the scheme's
    registry decides what each one quantizes. With ``preserve_sparsity`` (a pruned model), the
    zero weights stay zero through training.
    """
    if isinstance(scheme, str):
        scheme = get_scheme(scheme)
    functional = fold_batchnorm(conv_head(model))

    def annotate(layer):
        if isinstance(layer, tf.keras.layers.InputLayer):
            return layer
        return tfq.quantize_annotate_layer(layer)

    with quantize_scope():
        annotated = tf.keras.models.clone_model(functional, clone_function=annotate)
        annotated.set_weights(functional.get_weights())
        quantized = tfq.quantize_apply(
            annotated, QuartzNetQuantizeScheme(scheme, preserve_sparsity)
        )
    quantized = _loadable(quantized)
    if preserve_sparsity:
        init_sparsity_masks(quantized)
    return quantized


_SAVABLE = {
    quantize_layer.QuantizeLayer: InputQuantize,
    quantize_wrapper.QuantizeWrapperV2: SavableQuantizeWrapper,
}


def _loadable(model):
    """The model with tfmot's ``QuantizeLayer`` / ``QuantizeWrapperV2`` replaced by the
    subclasses here that round-trip through ``.keras`` files; weights copied."""

    def swap(layer):
        cls = _SAVABLE.get(type(layer))
        return cls.from_config(layer.get_config()) if cls else layer

    with quantize_scope():
        swapped = tf.keras.models.clone_model(model, clone_function=swap)
    for layer in model.layers:
        if type(layer) in _SAVABLE:
            swapped.get_layer(layer.name).set_weights(layer.get_weights())
    return swapped


def _kernel_quantizers(model):
    """(wrapper, kernel variable, quantizer variables) for every quantized kernel."""
    for layer in model.layers:
        for weight, quantizer, variables in getattr(layer, "_weight_vars", []):
            if isinstance(quantizer, KernelQuantizer):
                yield layer, weight, variables


def init_sparsity_masks(model) -> None:
    """Sets each sparsity-preserving mask to ``kernel != 0`` (after the weights are in place)."""
    for _, weight, variables in _kernel_quantizers(model):
        if "sparsity_mask" in variables:
            variables["sparsity_mask"].assign(tf.cast(tf.not_equal(weight, 0), weight.dtype))


def quantized_kernels(model) -> dict:
    """``{layer name: fake-quantized kernel}`` as numpy arrays (what the integer model stores)."""
    out = {}
    for layer, weight, variables in _kernel_quantizers(model):
        quantizer = next(q for w, q, _ in layer._weight_vars if w is weight)
        out[layer.layer.name] = quantizer(weight, False, variables).numpy()
    return out


def widen_low_bit_kernels(model) -> None:
    """Re-expresses sub-8-bit kernels as 8-bit fake quantization with the same step (in place).

    The TFLite converter does not keep a 4-bit fake-quantization grid: it re-quantizes such
    weights to full 8-bit precision. So the export graph (a throwaway copy) stores each kernel as
    its 4-bit quantized values and quantizes them with 8 bits over ``+-127`` steps of the 4-bit
    step size, which maps every 4-bit level exactly onto an int8 value: TFLite then holds the
    trained 4-bit weights (int8 storage, at most 15 distinct values per channel).
    """
    for layer, weight, variables in _kernel_quantizers(model):
        quantizer = next(q for w, q, _ in layer._weight_vars if w is weight)
        if quantizer.num_bits >= 8:
            continue
        weight.assign(quantizer(weight, False, variables))
        levels = 2**quantizer.num_bits - 2  # narrow range: 2^b - 1 levels, 2^b - 2 steps
        step = (variables["max_var"] - variables["min_var"]) / levels
        variables["min_var"].assign(-127.0 * step)
        variables["max_var"].assign(127.0 * step)
        quantizer.num_bits = 8
