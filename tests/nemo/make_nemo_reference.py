"""NeMo side of the import parity test: runs in its own venv (`.venv-nemo`, made by
`make test-nemo`) with `nemo_toolkit[asr]==3.0.0` and `torch==2.13.0`, never in the main one.

For each case it builds an `EncDecCTCModel` from a config, gives it random weights and
randomized BatchNorm statistics, saves it as `.nemo`, and records NeMo's own features,
log-probabilities, output lengths and greedy transcripts for real speech clips of different
lengths batched together (eval mode, dither 0, pad_to 0, as `transcribe()` runs).
`tests/nemo/test_nemo_parity.py` (main venv) imports each `.nemo` with `qn import-nemo` and
compares.

Usage: .venv-nemo/bin/python tests/nemo/make_nemo_reference.py --out build/nemo_parity
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

# The project's own corpus (always in the checkout, so CI needs nothing beside it); any folder
# with a NeMo-style dev.json works too, e.g. --data ../shared/data/speech-mini.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "sample_data"
LABELS = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]


def block(filters, kernel, repeat=1, stride=1, dilation=1, residual=False, separable=True, **kw):
    cfg = {
        "filters": filters,
        "repeat": repeat,
        "kernel": [kernel],
        "stride": [stride],
        "dilation": [dilation],
        "dropout": 0.0,
        "residual": residual,
        "separable": separable,
    }
    cfg.update(kw)
    return cfg


def quartznet_blocks(blocks_per_group, scale=1, **b_kwargs):
    groups = [(256, 33), (256, 39), (512, 51), (512, 63), (512, 75)]
    blocks = [block(256 // scale, 33, stride=2)]
    for filters, kernel in groups:
        for _ in range(blocks_per_group):
            blocks.append(block(filters // scale, kernel, 5, residual=True, **b_kwargs))
    blocks.append(block(512 // scale, 87, dilation=2))
    blocks.append(block(1024 // scale, 1, separable=False))
    return blocks


def jasper_dr_blocks(scale):
    filters = [256, 256, 384, 384, 512, 512, 640, 640, 768, 768]
    kernels = [11, 11, 13, 13, 17, 17, 21, 21, 25, 25]
    blocks = [block(256 // scale, 11, stride=2, separable=False, dropout=0.2)]
    for f, k in zip(filters, kernels, strict=True):
        blocks.append(block(f // scale, k, 5, residual=True, separable=False, residual_dense=True))
    blocks.append(block(896 // scale, 29, dilation=2, separable=False))
    blocks.append(block(1024 // scale, 1, separable=False))
    return blocks


# name -> (encoder blocks, encoder activation)
CASES = {
    # The released QuartzNet architectures, full size.
    "quartznet_5x5": (quartznet_blocks(1), "relu"),
    "quartznet_15x5": (quartznet_blocks(3), "relu"),
    # Jasper 10x5 DR's exact block list (non-separable, dense residual, dilated C2) with every
    # width divided by 8: the full 330M-parameter model takes minutes per pass on 2 cores and
    # writes a 1.3 GB .nemo.
    "jasper_10x5dr_eighth": (jasper_dr_blocks(8), "relu"),
    # Grouped pointwise convs (GroupShuffle shifts the mconv indices), squeeze-and-excitation,
    # Swish and kernel_size_factor: options the released models do not use but configs may.
    "quartznet_5x5_g2_se": (
        quartznet_blocks(
            1, scale=4, groups=2, se=True, se_reduction_ratio=4, kernel_size_factor=0.5
        ),
        "swish",
    ),
}


def model_config(blocks, activation):
    preprocessor = {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "normalize": "per_feature",
        "window_size": 0.02,
        "sample_rate": 16000,
        "window_stride": 0.01,
        "window": "hann",
        "features": 64,
        "n_fft": 512,
        "frame_splicing": 1,
        "dither": 0.00001,
    }
    return {
        "sample_rate": 16000,
        "labels": LABELS,
        "preprocessor": preprocessor,
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "rect_freq": 50,
            "rect_masks": 5,
            "rect_time": 120,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConvASREncoder",
            "feat_in": 64,
            "activation": activation,
            "conv_mask": True,
            "jasper": copy.deepcopy(blocks),
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": blocks[-1]["filters"],
            "num_classes": len(LABELS),
            "vocabulary": LABELS,
        },
    }


def load_clips(data_dir, count, seed, max_duration=4.5):
    """`count` dev clips of clearly different durations, NeMo-style float32 mono 16 kHz."""
    import numpy as np
    import soundfile as sf

    entries = [json.loads(line) for line in (data_dir / "dev.json").read_text().splitlines()]
    entries = sorted(
        (e for e in entries if e["duration"] <= max_duration), key=lambda e: e["duration"]
    )
    # Spread over the duration range so the batch has real padding at several amounts.
    picks = np.linspace(0, len(entries) - 1, count).round().astype(int)
    rng = np.random.default_rng(seed)
    rng.shuffle(picks)
    clips = []
    for i in picks:
        audio, rate = sf.read(data_dir / entries[i]["audio_filepath"], dtype="float32")
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if rate != 16000:
            sys.exit(f"{entries[i]['audio_filepath']}: expected 16 kHz, found {rate}")
        clips.append((entries[i]["audio_filepath"], audio))
    return clips


def randomize(model, batch, lengths, generator):
    """Random weights, random BatchNorm scales and shifts, and BatchNorm statistics measured on
    the clips themselves.

    In one eval-mode pass each BatchNorm, just before it runs, takes the mean and variance of
    its actual input over the valid frames of the whole batch (a pre-hook): the statistics are
    far from the 0/1 defaults an importer could silently assume, and every layer's output stays
    normalised, as in a trained network. (With statistics from train-mode passes, per clip, over
    a padded batch or over short pieces whose long kernels see mostly padding, activations grow
    1.4-3x per block on 15x5.)
    """
    import torch

    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.2, 0.2, generator=generator)
            elif param.dim() > 1:
                bound = (3.0 / param[0].numel()) ** 0.5
                param.uniform_(-bound, bound, generator=generator)
        for bn in bns:
            bn.weight.uniform_(0.7, 1.3, generator=generator)
        for block in model.encoder.encoder:
            if block.res is not None:
                # Residual blocks add a small correction to their input, as in a trained
                # network: with full-size corrections a random 15x5 doubles float32 rounding
                # differences at every block (1e-6 after C1, 0.2 in the log-probs). Mapping
                # errors still show: one reversed depthwise kernel moves log-probs by ~3.
                last_bn = [m for m in block.mconv if isinstance(m, torch.nn.BatchNorm1d)][-1]
                last_bn.weight.uniform_(0.1, 0.25, generator=generator)
        model.eval()
        features, feature_lengths = model.preprocessor(input_signal=batch, length=lengths)
        # Every encoder BatchNorm follows the stride-2 first convolution.
        valid_lengths = (feature_lengths + 1) // 2

        def calibrate(bn, inputs):
            x = inputs[0]  # [B, C, T]
            mask = torch.arange(x.shape[-1])[None, :] < valid_lengths[:, None]
            values = x.transpose(0, 1)[:, mask]  # [C, valid frames]
            bn.running_mean.copy_(values.mean(dim=1))
            bn.running_var.copy_(values.var(dim=1))

        hooks = [bn.register_forward_pre_hook(calibrate) for bn in bns]
        model.encoder(audio_signal=features, length=feature_lengths)
        for hook in hooks:
            hook.remove()


def with_noise_floor(batch, lengths, seed, rms=1e-3):
    """The clips plus a fixed white-noise floor at -60 dBFS inside each valid length.

    The synthetic clips are digitally clean: between words the spectrum spans 100 dB and more,
    and in such frames float32 FFT rounding (NeMo's torch.stft and TensorFlow's rfft alike)
    moves normalised features by ~1e-3 from the exact value. A recording's noise floor (or
    NeMo's training dither) removes that; with it both front ends agree to ~3e-5.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(batch.shape, generator=generator) * rms
    mask = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
    return batch + noise * mask


def run_case(name, blocks, activation, clips, out_dir, seed):
    import numpy as np
    import torch
    from nemo.collections.asr.models import EncDecCTCModel
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = EncDecCTCModel(cfg=OmegaConf.create(model_config(blocks, activation)))
    model.eval()
    lengths = torch.tensor([len(a) for _, a in clips], dtype=torch.int64)
    batch = torch.zeros(len(clips), int(lengths.max()))
    for b, (_, audio) in enumerate(clips):
        batch[b, : len(audio)] = torch.from_numpy(audio)
    randomize(model, batch, lengths, generator)
    # transcribe() runs with these; the features then do not depend on padding to 16.
    model.preprocessor.featurizer.dither = 0.0
    model.preprocessor.featurizer.pad_to = 0
    model.eval()
    arrays = {"lengths": lengths.numpy()}
    for variant, waveforms in (("clean", batch), ("noisy", with_noise_floor(batch, lengths, seed))):
        with torch.no_grad():
            features, feature_lengths = model.preprocessor(input_signal=waveforms, length=lengths)
            logprobs, encoded_lengths, _ = model.forward(
                input_signal=waveforms, input_signal_length=lengths
            )
            hypotheses = model.decoding.ctc_decoder_predictions_tensor(
                logprobs, decoder_lengths=encoded_lengths, return_hypotheses=False
            )
            # NeMo >= 2.x also deletes one space before punctuation in the vocabulary (the
            # apostrophe); the plain CTC collapse, as NeMo 1.x and qn-keras decode, is kept too.
            punctuation = model.decoding.supported_punctuation
            model.decoding.supported_punctuation = set()
            collapsed = model.decoding.ctc_decoder_predictions_tensor(
                logprobs, decoder_lengths=encoded_lengths, return_hypotheses=False
            )
            model.decoding.supported_punctuation = punctuation
        arrays.update(
            {
                f"{variant}_waveforms": waveforms.numpy(),
                # [B, T, 64], the qn_keras layout
                f"{variant}_features": features.numpy().transpose(0, 2, 1),
                f"{variant}_feature_lengths": feature_lengths.numpy(),
                f"{variant}_logprobs": logprobs.numpy(),
                f"{variant}_logprob_lengths": encoded_lengths.numpy(),
                f"{variant}_transcripts": np.array([h.text for h in hypotheses]),
                f"{variant}_collapsed": np.array([h.text for h in collapsed]),
            }
        )
    nemo_path = out_dir / f"{name}.nemo"
    model.save_to(str(nemo_path))
    np.savez(out_dir / f"{name}.npz", **arrays)
    params = sum(p.numel() for p in model.parameters())
    return {"name": name, "params": int(params), "nemo": nemo_path.name}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import nemo
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not (args.data / "dev.json").is_file():
        sys.exit(f"speech clips not found: {args.data / 'dev.json'} (pass --data)")
    clips = load_clips(args.data, args.clips, args.seed)
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, name in enumerate(args.cases):
        if name not in CASES:
            sys.exit(f"unknown case {name!r}; known: {', '.join(CASES)}")
        start = time.time()
        blocks, activation = CASES[name]
        info = run_case(name, blocks, activation, clips, tmp, args.seed + i)
        info["seconds"] = round(time.time() - start, 1)
        print(f"{name}: {info['params']:,} parameters, {info['seconds']} s", flush=True)
        cases.append(info)
    manifest = {
        "nemo_version": nemo.__version__,
        "torch_version": torch.__version__,
        "clips": [path for path, _ in clips],
        "cases": cases,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if args.out.exists():
        import shutil

        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
