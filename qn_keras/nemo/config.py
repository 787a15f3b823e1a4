"""Reads a NeMo ``model_config.yaml`` into qn_keras terms: labels, featurizer, block lists.

Accepts both config styles NeMo has written: the flat ``_target_:`` style (NeMo >= 1.0 final)
and the older ``cls:`` + ``params:`` style of early 1.0 checkpoints such as
QuartzNet15x5Base-En. Anything qn_keras cannot reproduce exactly (other model types, other
front ends, block options without a qn_keras equivalent) is rejected with a
:class:`NemoImportError` that names the setting, never silently approximated.
"""

from __future__ import annotations

import dataclasses
import math
import re

from qn_keras.errors import UserInputError
from qn_keras.quartznet_backbone import STACKWISE_ARGS

LOG_ZERO_GUARD = 2.0**-24


class NemoImportError(UserInputError):
    """A ``.nemo`` file that cannot be imported; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class NemoBlock:
    """One NeMo ``JasperBlock`` as the checkpoint lays it out (kernel already scaled)."""

    in_channels: int
    filters: int
    kernel_size: int
    stride: int
    dilation: int
    repeat: int
    residual: bool
    residual_dense: bool
    residual_panes: tuple  # input channels of each residual branch (one unless dense)
    separable: bool
    groups: int
    se: bool
    se_reduction_ratio: int
    dropout: float


@dataclasses.dataclass(frozen=True)
class NemoModelSpec:
    """What an importer needs from ``model_config.yaml``."""

    target: str
    nemo_version: str | None
    labels: tuple
    featurizer: dict  # FeaturizerConfig fields except ``era``
    window_type: str
    activation: str
    conv_mask: bool
    num_features: int
    blocks: tuple  # of NemoBlock
    notes: tuple  # settings accepted with a remark (recorded in the model folder)

    def model_kwargs(self) -> dict:
        """Keyword arguments for :class:`qn_keras.QuartzNetCTC`."""
        blocks = self.blocks
        ratios = {b.se_reduction_ratio for b in blocks if b.se}
        kwargs = {
            "vocabulary_size": len(self.labels) + 1,
            "stackwise_filters": [b.filters for b in blocks],
            "stackwise_kernel_sizes": [b.kernel_size for b in blocks],
            "stackwise_strides": [b.stride for b in blocks],
            "stackwise_dilations": [b.dilation for b in blocks],
            "stackwise_repeats": [b.repeat for b in blocks],
            "stackwise_residual": [b.residual for b in blocks],
            "stackwise_separable": [b.separable for b in blocks],
            "stackwise_groups": [b.groups for b in blocks],
            "stackwise_dropout": [b.dropout for b in blocks],
            "stackwise_residual_dense": [b.residual_dense for b in blocks],
            "stackwise_se": [b.se for b in blocks],
            "num_features": self.num_features,
            "activation": self.activation,
            # NeMo scales kernels per block; the scaled sizes are already in the lists.
            "kernel_size_factor": 1.0,
            "se_reduction_ratio": ratios.pop() if ratios else 8,
        }
        assert set(k for k in kwargs if k.startswith("stackwise_")) == set(STACKWISE_ARGS)
        return kwargs


# --------------------------------------------------------------------------- generic helpers


def section(config: dict, name: str, required: bool = True) -> tuple[str, dict]:
    """``(target class path, parameters)`` of a config node in either style."""
    node = config.get(name)
    if node is None:
        if required:
            raise NemoImportError(f"model_config.yaml has no '{name}' section.")
        return "", {}
    if not isinstance(node, dict):
        raise NemoImportError(f"model_config.yaml: '{name}' must be a mapping, found {node!r}.")
    if "cls" in node and "_target_" not in node:
        params = node.get("params") or {}
        if not isinstance(params, dict):
            raise NemoImportError(f"model_config.yaml: '{name}.params' must be a mapping.")
        return str(node["cls"]), dict(params)
    params = {k: v for k, v in node.items() if k != "_target_"}
    return str(node.get("_target_", "")), params


_INTERPOLATION = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def resolve_interpolations(config: dict) -> dict:
    """Resolves OmegaConf references of the form ``${a.b}`` (whole-value only), which some
    saved configs keep (``vocabulary: ${labels}``)."""

    def lookup(path, seen):
        if path in seen:
            raise NemoImportError(f"model_config.yaml: circular reference ${{{path}}}.")
        node = config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise NemoImportError(f"model_config.yaml: unresolved reference ${{{path}}}.")
            node = node[part]
        return resolve(node, seen | {path})

    def resolve(node, seen=frozenset()):
        if isinstance(node, str):
            match = _INTERPOLATION.match(node)
            return lookup(match.group(1), seen) if match else node
        if isinstance(node, dict):
            return {k: resolve(v, seen) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, seen) for v in node]
        return node

    return resolve(config)


def parse_version(version) -> tuple[int, int] | None:
    """``"1.0.0rc1"`` -> ``(1, 0)``; None when absent or unreadable."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)", str(version)) if version is not None else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _one(value, name, where):
    """NeMo writes kernel/stride/dilation as one-element lists."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise NemoImportError(f"{where}: {name} {value!r} has more than one entry.")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NemoImportError(f"{where}: {name} must be a positive integer, found {value!r}.")
    return value


def compute_new_kernel_size(kernel_size: int, factor: float) -> int:
    """NeMo's ``compute_new_kernel_size``: scale, then make odd (even sizes round up)."""
    new = max(int(kernel_size * factor), 1)
    return new + 1 if new % 2 == 0 else new


# --------------------------------------------------------------------------- model type


def check_model_type(config: dict) -> str:
    """The model class path; NemoImportError for anything but a character CTC conv model."""
    target = str(config.get("target") or "")
    name = target.rsplit(".", 1)[-1]
    what = f"{name or 'this model'}"
    if "tokenizer" in config or "BPE" in name:
        raise NemoImportError(
            f"{what} uses a subword (BPE/WPE) tokenizer; qn-keras imports character-vocabulary "
            "CTC models only (QuartzNet, Jasper, e.g. stt_en_quartznet15x5)."
        )
    if "joint" in config or re.search(r"RNNT|Transducer|Hybrid|TDT", name):
        raise NemoImportError(
            f"{what} is an RNN-T/transducer model; qn-keras imports CTC models only "
            "(QuartzNet, Jasper, e.g. stt_en_quartznet15x5)."
        )
    if name and name not in ("EncDecCTCModel", "EncDecCTCModelConfig"):
        raise NemoImportError(
            f"{target} is not a NeMo EncDecCTCModel; qn-keras imports character CTC models "
            "with a convolutional encoder (QuartzNet, Jasper)."
        )
    encoder_target, _ = section(config, "encoder")
    decoder_target, _ = section(config, "decoder")
    if not encoder_target:
        raise NemoImportError("model_config.yaml: the encoder has no _target_/cls class path.")
    encoder_name = encoder_target.rsplit(".", 1)[-1]
    if encoder_name != "ConvASREncoder":
        kind = "Conformer" if "Conformer" in encoder_name else encoder_name
        raise NemoImportError(
            f"the encoder is {encoder_target} ({kind}); qn-keras imports only the "
            "convolutional ConvASREncoder of QuartzNet/Jasper."
        )
    decoder_name = decoder_target.rsplit(".", 1)[-1]
    if decoder_name != "ConvASRDecoder":
        raise NemoImportError(
            f"the decoder is {decoder_target or 'missing'}; qn-keras imports only the CTC "
            "ConvASRDecoder."
        )
    return target or "nemo.collections.asr.models.EncDecCTCModel"


# --------------------------------------------------------------------------- preprocessor

# setting -> value qn_keras requires (NeMo's default where the config leaves it unset)
_FIXED_PREPROCESSOR = {
    "normalize": "per_feature",
    "log": True,
    "log_zero_guard_type": "add",
    "frame_splicing": 1,
    "exact_pad": False,
    "pad_value": 0,
    "mag_power": 2.0,
}
# training-only or superseded settings that have no effect at inference
_IGNORED_PREPROCESSOR = {
    "pad_to",
    "rng",
    "nb_augmentation_prob",
    "nb_max_freq",
    "use_grads",
    "mel_norm",  # the filterbank is loaded from the checkpoint
    "stft_exact_pad",
    "stft_conv",
    "use_torchaudio",
    "max_duration",
    "normalize_time_domain",
}


def parse_preprocessor(config: dict, notes: list) -> tuple[dict, str]:
    target, params = section(config, "preprocessor")
    if target.rsplit(".", 1)[-1] != "AudioToMelSpectrogramPreprocessor":
        raise NemoImportError(
            f"the preprocessor is {target or 'unspecified'}; qn-keras reproduces only NeMo's "
            "AudioToMelSpectrogramPreprocessor (log-mel features)."
        )
    for key, required in _FIXED_PREPROCESSOR.items():
        if key in params and params[key] != required:
            raise NemoImportError(
                f"preprocessor {key}={params[key]!r} is not supported (qn-keras reproduces "
                f"{key}={required!r}, the QuartzNet setting)."
            )
    guard = params.get("log_zero_guard_value", LOG_ZERO_GUARD)
    if isinstance(guard, str) or not math.isclose(float(guard), LOG_ZERO_GUARD, rel_tol=1e-6):
        raise NemoImportError(
            f"preprocessor log_zero_guard_value={guard!r} is not supported (qn-keras uses 2**-24)."
        )
    if params.get("stft_conv") or params.get("stft_exact_pad"):
        notes.append(
            "stft_conv/stft_exact_pad set in the config: NeMo >= 1.x ignores them and uses "
            "torch.stft, as qn-keras does."
        )
    sample_rate = int(params.get("sample_rate", config.get("sample_rate", 16000)))
    win = _window_samples(params, "window_size", "n_window_size", 0.02, sample_rate)
    hop = _window_samples(params, "window_stride", "n_window_stride", 0.01, sample_rate)
    n_fft = params.get("n_fft") or 2 ** math.ceil(math.log2(win))
    window_type = params.get("window", "hann")
    if window_type in (None, "none", "null", "ones"):
        raise NemoImportError(
            f"preprocessor window={window_type!r} (no window) is not supported; the checkpoint "
            "has no window buffer to load."
        )
    highfreq = params.get("highfreq")
    preemph = params.get("preemph", 0.97)
    featurizer = {
        "sample_rate": sample_rate,
        "num_mels": int(params.get("features", params.get("nfilt", 64))),
        "window_size": win / sample_rate,
        "window_stride": hop / sample_rate,
        "n_fft": int(n_fft),
        "preemph": float(preemph) if preemph is not None else 0.0,
        "lowfreq": float(params.get("lowfreq", 0) or 0.0),
        "highfreq": float(highfreq) if highfreq else None,
        "dither": float(params.get("dither", 1e-5) or 0.0),
    }
    # FeaturizerConfig derives samples as int(seconds * rate): make sure that round-trips.
    for name, samples in (("window_size", win), ("window_stride", hop)):
        if int(featurizer[name] * sample_rate) != samples:
            featurizer[name] = (samples + 1e-9) / sample_rate
    return featurizer, str(window_type)


def _window_samples(params, seconds_key, samples_key, default, sample_rate) -> int:
    if params.get(seconds_key) and params.get(samples_key):
        raise NemoImportError(f"preprocessor sets both {seconds_key} and {samples_key}.")
    if params.get(samples_key):
        return int(params[samples_key])
    return int(float(params.get(seconds_key) or default) * sample_rate)


# --------------------------------------------------------------------------- labels


def parse_labels(config: dict) -> tuple:
    _, decoder = section(config, "decoder")
    labels = decoder.get("vocabulary")
    if labels is None:
        labels = config.get("labels")
    if not labels or not isinstance(labels, (list, tuple)):
        raise NemoImportError(
            "model_config.yaml has no character vocabulary (decoder.vocabulary or labels)."
        )
    bad = [label for label in labels if not isinstance(label, str) or len(label) != 1]
    if bad:
        raise NemoImportError(
            f"the vocabulary is not single characters (found {bad[:5]!r}); qn-keras imports "
            "character CTC models only."
        )
    if len(set(labels)) != len(labels):
        raise NemoImportError("the vocabulary has duplicate labels.")
    num_classes = decoder.get("num_classes", len(labels))
    if num_classes not in (None, -1, 0, len(labels)):
        raise NemoImportError(
            f"decoder.num_classes ({num_classes}) differs from the vocabulary size ({len(labels)})."
        )
    if decoder.get("add_blank", True) is not True:
        raise NemoImportError("decoder.add_blank is false; qn-keras models always add the blank.")
    return tuple(labels)


# --------------------------------------------------------------------------- encoder

_BLOCK_KEYS = {
    "filters",
    "repeat",
    "kernel",
    "stride",
    "dilation",
    "dropout",
    "residual",
    "residual_dense",
    "residual_mode",
    "groups",
    "separable",
    "heads",
    "se",
    "se_reduction_ratio",
    "se_context_size",
    "se_interpolation_mode",
    "kernel_size_factor",
    "stride_last",
    "future_context",
}
ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish"}


def parse_encoder(config: dict, notes: list) -> dict:
    _, params = section(config, "encoder")
    activation = params.get("activation")
    if activation not in ACTIVATIONS:
        raise NemoImportError(
            f"encoder activation {activation!r} is not supported (qn-keras: relu, swish/silu)."
        )
    if params.get("normalization_mode", "batch") != "batch":
        raise NemoImportError(
            f"encoder normalization_mode={params['normalization_mode']!r} is not supported "
            "(qn-keras uses BatchNorm)."
        )
    if params.get("quantize"):
        raise NemoImportError("encoder quantize=true (pytorch_quantization) is not supported.")
    if int(params.get("frame_splicing", 1)) != 1:
        raise NemoImportError("encoder frame_splicing > 1 is not supported.")
    conv_mask = bool(params.get("conv_mask", True))
    if not conv_mask:
        notes.append(
            "NeMo conv_mask=false: NeMo does not mask padded frames; qn-keras always does, so "
            "the two agree exactly on unpadded single utterances and qn-keras stays "
            "padding-invariant on batches."
        )
    feat_in = params.get("feat_in")
    if not isinstance(feat_in, int) or feat_in < 1:
        raise NemoImportError(f"encoder feat_in must be a positive integer, found {feat_in!r}.")
    default_residual_mode = params.get("residual_mode", "add")
    jasper = params.get("jasper")
    if not isinstance(jasper, list) or not jasper:
        raise NemoImportError("encoder.jasper (the block list) is missing or empty.")
    blocks = []
    channels = feat_in
    panes: list[int] = []
    for i, raw in enumerate(jasper):
        where = f"encoder block {i}"
        if not isinstance(raw, dict):
            raise NemoImportError(f"{where} is not a mapping.")
        unknown = sorted(set(raw) - _BLOCK_KEYS)
        if unknown:
            notes.append(f"{where}: ignored unknown keys {unknown}.")
        for key in ("filters", "repeat", "kernel", "stride", "dilation", "residual"):
            if key not in raw:
                raise NemoImportError(f"{where} has no '{key}'.")
        factor = float(raw.get("kernel_size_factor", 1.0))
        kernel = compute_new_kernel_size(_one(raw["kernel"], "kernel", where), factor)
        stride = _one(raw["stride"], "stride", where)
        dilation = _one(raw["dilation"], "dilation", where)
        repeat = _one(raw["repeat"], "repeat", where)
        filters = _one(raw["filters"], "filters", where)
        groups = int(raw.get("groups", 1))
        residual = bool(raw["residual"])
        residual_mode = raw.get("residual_mode", default_residual_mode)
        for key, default in (("heads", -1), ("future_context", -1), ("se_context_size", -1)):
            if raw.get(key, default) != default:
                raise NemoImportError(
                    f"{where}: {key}={raw[key]!r} is not supported (qn-keras supports "
                    f"{key}={default})."
                )
        if stride > 1 and dilation > 1:
            raise NemoImportError(f"{where}: stride and dilation cannot both exceed 1.")
        if stride > 1 and repeat > 1:
            which = "the last sub-block" if raw.get("stride_last") else "every sub-block"
            raise NemoImportError(
                f"{where}: stride {stride} with repeat {repeat} is not supported (NeMo strides "
                f"{which}; qn-keras strides the first). QuartzNet and Jasper stride only in "
                "single-sub-block blocks."
            )
        if residual_mode not in ("add", "stride_add"):
            raise NemoImportError(
                f"{where}: residual_mode={residual_mode!r} is not supported (qn-keras adds)."
            )
        if residual and stride > 1 and residual_mode != "stride_add":
            raise NemoImportError(
                f"{where}: a strided block with residual_mode 'add' cannot run in NeMo either."
            )
        if groups < 1 or filters % groups or channels % groups:
            raise NemoImportError(
                f"{where}: groups={groups} does not divide the channels ({channels}->{filters})."
            )
        dense = bool(raw.get("residual_dense", False))
        if dense:
            panes.append(channels)
        block_panes = tuple(panes) if (dense and residual) else ((channels,) if residual else ())
        se = bool(raw.get("se", False))
        ratio = int(raw.get("se_reduction_ratio", 8))
        if se and filters // ratio < 1:
            raise NemoImportError(f"{where}: se_reduction_ratio {ratio} > filters {filters}.")
        blocks.append(
            NemoBlock(
                in_channels=channels,
                filters=filters,
                kernel_size=kernel,
                stride=stride,
                dilation=dilation,
                repeat=repeat,
                residual=residual,
                residual_dense=dense,
                residual_panes=block_panes,
                separable=bool(raw.get("separable", False)),
                groups=groups,
                se=se,
                se_reduction_ratio=ratio,
                dropout=float(raw.get("dropout", 0.0) or 0.0),
            )
        )
        channels = filters
    ratios = sorted({b.se_reduction_ratio for b in blocks if b.se})
    if len(ratios) > 1:
        raise NemoImportError(
            f"blocks use different se_reduction_ratio values {ratios}; qn-keras uses one per model."
        )
    return {
        "activation": ACTIVATIONS[activation],
        "conv_mask": conv_mask,
        "num_features": feat_in,
        "blocks": tuple(blocks),
    }


# --------------------------------------------------------------------------- entry point


def parse_model_config(config: dict) -> NemoModelSpec:
    """A :class:`NemoModelSpec` from a parsed ``model_config.yaml`` (either style)."""
    if not isinstance(config, dict):
        raise NemoImportError("model_config.yaml is not a mapping.")
    config = resolve_interpolations(config)
    target = check_model_type(config)
    notes: list[str] = []
    labels = parse_labels(config)
    featurizer, window_type = parse_preprocessor(config, notes)
    encoder = parse_encoder(config, notes)
    if featurizer["num_mels"] != encoder["num_features"]:
        raise NemoImportError(
            f"preprocessor features ({featurizer['num_mels']}) differ from encoder feat_in "
            f"({encoder['num_features']})."
        )
    _, decoder = section(config, "decoder")
    feat_in = decoder.get("feat_in")
    last = encoder["blocks"][-1].filters
    if feat_in not in (None, last):
        raise NemoImportError(
            f"decoder feat_in ({feat_in}) differs from the last encoder block's filters ({last})."
        )
    return NemoModelSpec(
        target=target,
        nemo_version=str(config["nemo_version"]) if config.get("nemo_version") else None,
        labels=labels,
        featurizer=featurizer,
        window_type=window_type,
        activation=encoder["activation"],
        conv_mask=encoder["conv_mask"],
        num_features=encoder["num_features"],
        blocks=encoder["blocks"],
        notes=tuple(notes),
    )
