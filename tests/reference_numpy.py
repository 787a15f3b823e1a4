"""Independent float64 NumPy reference of NeMo's QuartzNet front end and encoder/decoder.

Written from the spec (`nemo_quartznet.md` sections 1.2, 2 and 5), not from `qn_keras`, and it
must never import `qn_keras`: the tests compare the two. It is deliberately plain (loops over
kernel taps, per-utterance processing, channel-first `[C, T]` like PyTorch) so that an error in
the optimised TensorFlow graph cannot be repeated here by construction.

Cross-checked once while it was written (not at test time, which must not need PyTorch): the
filterbank against librosa 0.11.0 `filters.mel(norm="slaney")` (max |diff| 1.1e-9, librosa's
float32 rounding); the "current" features against NeMo 3.0.0 `FilterbankFeatures` (3.5e-5 on
three speech clips batched with garbage padding); the encoder/decoder against NeMo 3.0.0
`ConvASREncoder`/`ConvASRDecoder` with masks on a garbage-padded batch (<= 1.5e-6 for
QuartzNet-, grouped-, Jasper-DR- and SE/Swish/stride_last-shaped tiny configs).
"""

from __future__ import annotations

import math

import numpy as np

HOP = 160
WIN = 320
N_FFT = 512
SAMPLE_RATE = 16000
NUM_MELS = 64
PREEMPH = 0.97
LOG_GUARD = 2.0**-24
STD_EPS = 1e-5
BN_EPS = 1e-3


# --------------------------------------------------------------------------- mel filterbank


def hz_to_slaney_mel(hz: float) -> float:
    """Slaney's Auditory Toolbox mel scale: 3 mels per 200 Hz up to 1 kHz, then log-spaced
    with 27 steps per factor 6.4 in frequency."""
    if hz < 1000.0:
        return 3.0 * hz / 200.0
    return 15.0 + 27.0 * math.log(hz / 1000.0) / math.log(6.4)


def slaney_mel_to_hz(mel: float) -> float:
    if mel < 15.0:
        return 200.0 * mel / 3.0
    return 1000.0 * 6.4 ** ((mel - 15.0) / 27.0)


def slaney_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    num_mels: int = NUM_MELS,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """`librosa.filters.mel(htk=False, norm='slaney')`, built one triangle at a time.

    Triangle m rises from edge m to edge m+1 and falls to edge m+2 (edges equally spaced on the
    Slaney mel scale); its height is 2 / (f_{m+2} - f_m), so each triangle has unit area in Hz.
    """
    fmax = sample_rate / 2.0 if fmax is None else fmax
    lo, hi = hz_to_slaney_mel(fmin), hz_to_slaney_mel(fmax)
    edges = [slaney_mel_to_hz(lo + (hi - lo) * i / (num_mels + 1)) for i in range(num_mels + 2)]
    bins = n_fft // 2 + 1
    bin_hz = [k * sample_rate / n_fft for k in range(bins)]
    fb = np.zeros((num_mels, bins), dtype=np.float64)
    for m in range(num_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        height = 2.0 / (right - left)
        for k, f in enumerate(bin_hz):
            if left < f <= centre:
                fb[m, k] = height * (f - left) / (centre - left)
            elif centre < f < right:
                fb[m, k] = height * (right - f) / (right - centre)
    return fb


def symmetric_hann_in_fft_frame(win: int = WIN, n_fft: int = N_FFT) -> np.ndarray:
    """`torch.hann_window(win, periodic=False)` zero-padded, centred, to `n_fft`."""
    n = np.arange(win)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (win - 1))
    out = np.zeros(n_fft)
    left = (n_fft - win) // 2
    out[left : left + win] = w
    return out


# --------------------------------------------------------------------------- featurizer


def nemo_log_mel(waveforms, lengths, era: str = "current", filterbank=None):
    """NeMo `FilterbankFeatures` steps 1-7 (eval mode) on a right-padded batch.

    Args:
        waveforms: `[B, S]` array (any values past each length).
        lengths: `[B]` valid samples per row.
        era: "current" (NeMo >= 2.5) or "legacy" (NeMo <= 2.4).

    Returns:
        `(log_mel [B, 1 + S // 160, 64], seq_len [B])`, float64 / int64, not normalised and
        not masked. (Channel-last, the layout qn_keras uses.)
    """
    if era not in ("current", "legacy"):
        raise ValueError(era)
    x = np.asarray(waveforms, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    batch, samples = x.shape
    fb = slaney_filterbank() if filterbank is None else np.asarray(filterbank, np.float64)
    window = symmetric_hann_in_fft_frame()
    num_frames = 1 + samples // HOP
    seq_len = lengths // HOP if era == "current" else lengths // HOP + 1
    out = np.zeros((batch, num_frames, fb.shape[0]))
    for b in range(batch):
        row = x[b]
        y = np.empty_like(row)
        y[0] = row[0]
        y[1:] = row[1:] - PREEMPH * row[:-1]
        if era == "current":
            y[lengths[b] :] = 0.0
            padded = np.concatenate([np.zeros(N_FFT // 2), y, np.zeros(N_FFT // 2)])
        else:
            # torch 'reflect' excludes the edge sample, like numpy's 'reflect'
            padded = np.pad(y, N_FFT // 2, mode="reflect")
        spec = np.empty((num_frames, N_FFT // 2 + 1))
        for t in range(num_frames):
            frame = padded[t * HOP : t * HOP + N_FFT] * window
            spec[t] = np.abs(np.fft.rfft(frame)) ** 2
        out[b] = np.log(spec @ fb.T + LOG_GUARD)
    return out, seq_len


def per_feature_normalize(log_mel, seq_len):
    """NeMo `normalize_batch(..., "per_feature")` then zero frames at or past each length."""
    out = np.zeros_like(log_mel)
    for b, n in enumerate(np.asarray(seq_len)):
        valid = log_mel[b, :n]
        mean = valid.mean(axis=0)
        std = np.sqrt(((valid - mean) ** 2).sum(axis=0) / (n - 1))  # unbiased
        out[b, :n] = (valid - mean) / (std + STD_EPS)  # epsilon on the std, not the variance
    return out


def nemo_features(waveforms, lengths, era: str = "current", filterbank=None):
    """NeMo's normalised features: `(features [B, 1 + S // 160, 64], seq_len [B])`; frames at or
    past each length are 0."""
    log_mel, seq_len = nemo_log_mel(waveforms, lengths, era, filterbank)
    return per_feature_normalize(log_mel, seq_len), seq_len


# --------------------------------------------------------------------------- encoder / decoder


def conv1d(x, weight, stride=1, dilation=1, padding=0, groups=1):
    """PyTorch `Conv1d` semantics, no bias. `x` `[C_in, T]`, `weight` `[C_out, C_in/groups, K]`.
    `padding`: zeros on each side, or `(left, right)`."""
    c_in, length = x.shape
    c_out, c_in_g, kernel = weight.shape
    assert c_in == c_in_g * groups, (c_in, c_in_g, groups)
    left, right = padding if isinstance(padding, tuple) else (padding, padding)
    xp = np.concatenate([np.zeros((c_in, left)), x, np.zeros((c_in, right))], axis=1)
    t_out = (length + left + right - dilation * (kernel - 1) - 1) // stride + 1
    out = np.zeros((c_out, t_out))
    c_out_g = c_out // groups
    for g in range(groups):
        w = weight[g * c_out_g : (g + 1) * c_out_g]  # [c_out_g, c_in_g, K]
        xg = xp[g * c_in_g : (g + 1) * c_in_g]
        for k in range(kernel):
            start = k * dilation
            taps = xg[:, start : start + stride * (t_out - 1) + 1 : stride]  # [c_in_g, t_out]
            out[g * c_out_g : (g + 1) * c_out_g] += w[:, :, k] @ taps
    return out


def batch_norm(x, gamma, beta, mean, var):
    return (x - mean[:, None]) / np.sqrt(var[:, None] + BN_EPS) * gamma[:, None] + beta[:, None]


def group_shuffle(x, groups):
    """NeMo `GroupShuffle` on `[C, T]`: view `[g, C/g, T]`, swap the first two axes."""
    c, t = x.shape
    return x.reshape(groups, c // groups, t).transpose(1, 0, 2).reshape(c, t)


def activation(x, name):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "swish":
        return x / (1.0 + np.exp(-x))
    raise ValueError(name)


def squeeze_excite(x, w_squeeze, w_excite, act):
    """NeMo `SqueezeExcite` with global context on one unpadded utterance `[C, T]`.

    `w_squeeze` `[C, C/r]`, `w_excite` `[C/r, C]` (i.e. torch `Linear.weight.T`)."""
    pooled = x.mean(axis=1)
    scale = 1.0 / (1.0 + np.exp(-(activation(pooled @ w_squeeze, act) @ w_excite)))
    return x * scale[:, None]


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _depthwise_torch(kernel):
    # Keras DepthwiseConv2D (K, 1, C, 1) -> torch depthwise Conv1d (C, 1, K)
    return np.transpose(kernel[:, 0, :, 0], (1, 0))[:, None, :]


def _conv_torch(kernel):
    # Keras Conv2D (K, 1, C_in/g, C_out) -> torch Conv1d (C_out, C_in/g, K)
    return np.transpose(kernel[:, 0], (2, 1, 0))


def quartznet_forward(
    features, config: dict, weights: dict, stride_on: str = "last", right_padding=None
):
    """NeMo ConvASREncoder + ConvASRDecoder on ONE unpadded utterance, in float64.

    Args:
        features: `[T, num_features]` log-mel frames of the utterance (no padding).
        config: the model's `get_config()` (the `stackwise_*` lists, `activation`,
            `se_reduction_ratio`, `kernel_size_factor` 1.0 assumed).
        weights: layer name -> list of arrays (`layer.get_weights()`), with qn_keras's layer
            names (`block_{i}_sub_{j}_depthwise`, `..._bn`, `block_{i}_res_{p}_conv`, ...).
        stride_on: "first" or "last": which sub-block of a repeated strided block strides.
            NeMo's `stride_last=True` strides the last one (its default strides every one,
            S**R in all); qn_keras strides the first. They agree when R == 1, as in every
            strided block of QuartzNet and Jasper.

    Returns:
        `(logprobs [T', V], length T')`. Plain symmetric zero "same" padding, no masks: the
        spec's verified statement is that masked NeMo on a padded batch equals this.
    """
    assert config.get("kernel_size_factor", 1.0) == 1.0
    act = config["activation"]
    x = np.asarray(features, dtype=np.float64).T  # [C, T], NeMo layout
    xs = [x]
    for i in range(len(config["stackwise_filters"])):
        kernel = config["stackwise_kernel_sizes"][i]
        stride = config["stackwise_strides"][i]
        dilation = config["stackwise_dilations"][i]
        repeats = config["stackwise_repeats"][i]
        separable = config["stackwise_separable"][i]
        groups = config["stackwise_groups"][i]
        residual = config["stackwise_residual"][i]
        dense = config["stackwise_residual_dense"][i]
        padding = dilation * (kernel - 1) // 2
        block_in = xs[-1]
        out = block_in
        for j in range(repeats):
            s = stride if j == (0 if stride_on == "first" else repeats - 1) else 1
            name = f"block_{i}_sub_{j}"
            pad = padding
            if right_padding and (i, j) in right_padding:
                pad = (2 * padding - right_padding[(i, j)], right_padding[(i, j)])
            if separable:
                dw = _depthwise_torch(weights[f"{name}_depthwise"][0])
                out = conv1d(out, dw, s, dilation, pad, groups=out.shape[0])
                pw = _conv_torch(weights[f"{name}_pointwise"][0])
                out = conv1d(out, pw, groups=groups)
            else:
                w = _conv_torch(weights[f"{name}_conv"][0])
                out = conv1d(out, w, s, dilation, pad, groups=groups)
            out = batch_norm(out, *weights[f"{name}_bn"])
            if groups > 1:
                out = group_shuffle(out, groups)
            if j < repeats - 1:
                out = activation(out, act)
        if config["stackwise_se"][i]:
            squeeze, excite = weights[f"block_{i}_se"]
            out = squeeze_excite(out, squeeze, excite, act)
        if residual:
            # Jasper DR: one 1x1 conv + BN per earlier pane (encoder input and each earlier
            # dense block's output); plain residual: the block input only.
            sources = xs if dense else [block_in]
            for p, source in enumerate(sources):
                w = _conv_torch(weights[f"block_{i}_res_{p}_conv"][0])
                # NeMo residual_mode 'stride_add' when the block strides ('add' otherwise)
                res = conv1d(source, w, stride=stride)
                out = out + batch_norm(res, *weights[f"block_{i}_res_{p}_bn"])
        out = activation(out, act)
        xs = xs + [out] if (residual and dense) else [out]
    encoded = xs[-1].T  # [T', C]
    kernel, bias = weights["ctc_head_conv"]
    logprobs = log_softmax(encoded @ kernel + bias)
    return logprobs, encoded.shape[0]
