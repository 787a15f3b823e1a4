"""Parameter and multiply-accumulate counts of a QuartzNet model, from its block lists."""

from __future__ import annotations

from qn_keras.choices import HEAD_LAYER
from qn_keras.quartznet_backbone import output_stride, scale_kernel_size

FEATURE_FRAMES_PER_SECOND = 100  # 10 ms hop


def trainable_parameters(model) -> int:
    """Trainable parameters (what NeMo and the paper count: BN moving statistics excluded)."""
    return int(sum(int(w.shape.num_elements()) for w in model.trainable_weights))


def layer_macs(model) -> dict[str, float]:
    """Multiply-accumulates per second of audio of each weighted layer, by layer name.

    Depthwise ``C_in*K``, pointwise ``C_in*C_out/groups``, plain ``C_in*C_out*K/groups``,
    residual 1x1 ``C_in*C_out`` per output frame, at each block's output frame rate; SE
    (once per utterance) and the head's ``C*V`` included; BatchNorm, activations and the
    featurizer are not.
    """
    cfg = model.get_config()
    rate = float(FEATURE_FRAMES_PER_SECOND)
    channels = cfg["num_features"]
    out: dict[str, float] = {}
    panes: list[int] = []
    for i, filters in enumerate(cfg["stackwise_filters"]):
        kernel = scale_kernel_size(cfg["stackwise_kernel_sizes"][i], cfg["kernel_size_factor"])
        groups = cfg["stackwise_groups"][i]
        rate /= cfg["stackwise_strides"][i]
        c_in = channels
        for j in range(cfg["stackwise_repeats"][i]):
            prefix = f"block_{i}_sub_{j}"
            if cfg["stackwise_separable"][i]:
                out[f"{prefix}_depthwise"] = rate * c_in * kernel
                out[f"{prefix}_pointwise"] = rate * c_in * filters / groups
            else:
                out[f"{prefix}_conv"] = rate * c_in * filters * kernel / groups
            c_in = filters
        if cfg["stackwise_residual_dense"][i]:
            panes.append(channels)
            residual_inputs = list(panes)
        else:
            residual_inputs = [channels] if cfg["stackwise_residual"][i] else []
        if cfg["stackwise_residual"][i]:
            for p, c in enumerate(residual_inputs):
                out[f"block_{i}_res_{p}_conv"] = rate * c * filters
        if cfg["stackwise_se"][i]:
            out[f"block_{i}_se"] = 2 * filters * (filters // cfg["se_reduction_ratio"])
        channels = filters
    if "vocabulary_size" in cfg:
        out[HEAD_LAYER] = rate * channels * cfg["vocabulary_size"]
    return out


def macs_per_second(model) -> float:
    """Multiply-accumulates of convolutions and the head per second of audio (the sum of
    :func:`layer_macs`)."""
    return float(sum(layer_macs(model).values()))


def model_summary(model) -> dict:
    cfg = model.get_config()
    stride = output_stride(cfg)
    return {
        "name": model.name,
        "params": trainable_parameters(model),
        "params_total": int(model.count_params()),
        "macs_per_second": int(round(macs_per_second(model))),
        "blocks": len(cfg["stackwise_filters"]),
        "subsampling": stride,
        "output_frame_ms": 1000 // FEATURE_FRAMES_PER_SECOND * stride,
        "vocabulary_size": cfg.get("vocabulary_size"),
    }
