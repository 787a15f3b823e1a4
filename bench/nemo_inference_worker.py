"""NeMo side of bench/bench_inference.py: runs in `.venv-nemo` (nemo_toolkit[asr]==3.0.0,
torch==2.13.0, onnxruntime), never in the main venv.

Times NVIDIA NeMo's own QuartzNet `EncDecCTCModel` (random weights: speed does not depend on
them) on the clip batches bench_inference.py wrote, waveform in and text out:

- `nemo_pytorch`: preprocessor + encoder + decoder in PyTorch (2 threads), greedy CTC;
- `nemo_onnxruntime`: NeMo's own ONNX export (`model.export`, encoder + decoder) in ONNX
  Runtime with 2 threads; the features come from NeMo's PyTorch preprocessor (the export
  has no preprocessor), and that time is included.

Usage: .venv-nemo/bin/python bench/nemo_inference_worker.py --clips clips.npz --out nemo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "nemo"))
from make_nemo_reference import LABELS, model_config, quartznet_blocks  # noqa: E402

PRESETS = {"quartznet_5x5": 1, "quartznet_15x5": 3}


def greedy(logprobs: np.ndarray, lengths: np.ndarray) -> list[str]:
    blank = len(LABELS)
    texts = []
    for lp, n in zip(logprobs, lengths, strict=True):
        best = lp[: int(n)].argmax(-1)
        keep = (best != blank) & np.concatenate([[True], best[1:] != best[:-1]])
        texts.append("".join(LABELS[i] for i in best[keep]))
    return texts


def timed(fn, min_runs: int, min_seconds: float) -> list[float]:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return times


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-runs", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)

    import logging

    import onnxruntime as ort
    import torch
    from nemo.collections.asr.models import EncDecCTCModel
    from omegaconf import OmegaConf

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    clips = np.load(args.clips)
    configs = sorted({k.rsplit("_", 1)[0] for k in clips.files})  # "b1_20s", "b8_5s"
    results = []
    for preset in args.presets:
        blocks = quartznet_blocks(PRESETS[preset])
        model = EncDecCTCModel(cfg=OmegaConf.create(model_config(blocks, "relu"))).eval()
        model.preprocessor.featurizer.dither = 0.0
        model.preprocessor.featurizer.pad_to = 0
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = str(Path(tmp) / "model.onnx")
            model.export(onnx_path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        input_names = [i.name for i in session.get_inputs()]
        for config in configs:
            waveform = torch.from_numpy(clips[f"{config}_waveform"])
            lengths = torch.from_numpy(clips[f"{config}_lengths"].astype(np.int64))
            audio_seconds = float(lengths.sum()) / 16000

            def pytorch(model=model, waveform=waveform, lengths=lengths):
                with torch.inference_mode():
                    logprobs, out_lengths, _ = model.forward(
                        input_signal=waveform, input_signal_length=lengths
                    )
                return greedy(logprobs.numpy(), out_lengths.numpy())

            def onnxruntime(
                model=model, waveform=waveform, lengths=lengths, session=session, names=input_names
            ):
                with torch.inference_mode():
                    features, feature_lengths = model.preprocessor(
                        input_signal=waveform, length=lengths
                    )
                # NeMo's export takes the features alone, or features and lengths.
                feeds = {names[0]: features.numpy()}
                if len(names) > 1:
                    feeds[names[1]] = feature_lengths.numpy()
                (logprobs,) = session.run(None, feeds)[:1]
                out_lengths = (feature_lengths.numpy() + 1) // 2
                return greedy(logprobs, out_lengths)

            for engine, fn in (("nemo_pytorch", pytorch), ("nemo_onnxruntime", onnxruntime)):
                times = timed(fn, args.min_runs, args.min_seconds)
                median = statistics.median(times)
                results.append(
                    {
                        "preset": preset,
                        "config": config,
                        "engine": engine,
                        "median_s": median,
                        "runs": len(times),
                        "audio_s_per_s": audio_seconds / median,
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    versions = {"nemo_toolkit": __import__("nemo").__version__, "torch": torch.__version__}
    versions["onnxruntime"] = ort.__version__
    Path(args.out).write_text(json.dumps({"results": results, "versions": versions}, indent=1))


if __name__ == "__main__":
    main()
