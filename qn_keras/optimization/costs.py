"""Per-layer parameters, stored bits, memory and multiply-accumulates of QuartzNet models.

Definitions used in the optimization report (the quantized-QuartzNet table's conventions):

* parameters: trainable parameters of the float architecture (BatchNorm's moving statistics
  excluded), as ``qn_keras.summary`` counts them.
* memory (MB, 10^6 bytes): every convolution / head kernel at its stored weight width (32, 16,
  8 or 4 bits) plus the other trainable parameters (BatchNorm scale and shift, head bias) at
  32 bits in integer models (they become int32 biases once BatchNorm is folded) or at the float
  width. Dense storage: zeros of a pruned model still count (see gzip size for those).
* MACs: multiply-accumulates per second of audio (``qn_keras.summary.macs_per_second``), per
  layer; "16-bit normalized" MACs weight each layer's MACs by ``w_bits * a_bits / (16 * 16)``,
  so a 16-bit float model is the reference, 8x8-bit layers count 1/4 and 4-bit weights with
  8-bit activations 1/8 (the Brevitas table used 4-bit activations as well, hence 1/16 there).
"""

from __future__ import annotations

import dataclasses

from qn_keras.summary import layer_macs

MB = 1e6


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bit widths of one configuration.

    Attributes:
        weight_bits: kernel width of the inner layers.
        activation_bits: activation width (32 for float32, 16 for float16).
        edge_weight_bits: kernel width of the first block and the CTC head (None: weight_bits).
        other_bits: width of biases / BatchNorm parameters.
    """

    weight_bits: int
    activation_bits: int
    edge_weight_bits: int | None = None
    other_bits: int = 32

    def kernel_bits(self, layer_name: str) -> int:
        from qn_keras.optimization.quantize import is_edge_layer

        if self.edge_weight_bits is not None and is_edge_layer(layer_name):
            return self.edge_weight_bits
        return self.weight_bits


PRECISIONS = {
    "float32": Precision(32, 32),
    "float16": Precision(16, 16, other_bits=16),
    "dynamic": Precision(8, 32),
    "int8": Precision(8, 8),
    "int4": Precision(4, 8, edge_weight_bits=8),
}


KERNEL_ATTRS = ("kernel", "depthwise_kernel")


def layer_parameters(model) -> list[dict]:
    """``{layer, kernel, other}``: trainable kernel and other parameters per weighted layer."""
    rows = []
    for layer in model.layers:
        kernel = other = 0
        for w in layer.trainable_weights:
            n = int(w.shape.num_elements())
            if w.name.split("/")[-1].split(":")[0] in KERNEL_ATTRS:
                kernel += n
            else:
                other += n
        if kernel or other:
            rows.append({"layer": layer.name, "kernel": kernel, "other": other})
    return rows


def memory_bytes(model, precision: Precision) -> float:
    """Bytes of the weights at their stored widths (see the module docstring)."""
    bits = 0
    for row in layer_parameters(model):
        bits += row["kernel"] * precision.kernel_bits(row["layer"])
        bits += row["other"] * precision.other_bits
    return bits / 8


def normalized_macs(model, precision: Precision) -> float:
    """MACs per second of audio weighted by ``w_bits * a_bits / 256`` per layer."""
    total = 0.0
    for name, macs in layer_macs(model).items():
        total += macs * precision.kernel_bits(name) * precision.activation_bits / 256.0
    return total
