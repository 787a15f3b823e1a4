"""``qn optimize report``: one table of accuracy, size, compute and speed per configuration.

Each configuration is a ``qn optimize`` output (a model folder with ``model.tflite`` and an
``optimization`` entry in its metadata; a plain model folder counts as float32 and is converted
on the fly). Per configuration: WER and CER on a manifest through the TFLite model and through
the Keras model (the fake-quantized one for QAT rows), how often their transcripts agree,
parameters, non-zero kernel weights, memory at the stored bit width, MACs raw and normalized to
16 bits, TFLite file size and gzip size, and TFLite CPU speed (seconds of audio per second,
features precomputed, one utterance at a time). See :mod:`qn_keras.optimization.costs` for the
definitions.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from qn_keras import files
from qn_keras import tflite as lite
from qn_keras.errors import UserInputError
from qn_keras.model_dir import load_model_dir
from qn_keras.optimization import costs, prune, tflite
from qn_keras.optimization.evaluate import (
    agreement,
    keras_logprobs,
    load_features,
    score,
    transcribe,
)
from qn_keras.optimization.recipes import OPTIMIZATION_KEY, TFLITE_FILE, resolve_model_dir
from qn_keras.summary import trainable_parameters

REPORT_JSON = "optimization_report.json"
REPORT_MD = "optimization_report.md"
PLOT_MEMORY = "wer_vs_memory.png"
PLOT_MACS = "wer_vs_macs.png"

COLUMNS = (
    ("name", "configuration", "{}"),
    ("wer", "WER", "{:.2%}"),
    ("cer", "CER", "{:.2%}"),
    ("keras_wer", "Keras WER", "{:.2%}"),
    ("agreement", "TFLite = Keras", "{:.0%}"),
    ("params", "params", "{:,}"),
    ("nonzero_kernel_fraction", "non-zero kernels", "{:.0%}"),
    ("memory_mb", "memory (MB)", "{:.3f}"),
    ("mmacs", "MMACs/s", "{:.2f}"),
    ("mmacs_16bit", "MMACs/s (16-bit norm.)", "{:.2f}"),
    ("tflite_bytes", "TFLite (bytes)", "{:,}"),
    ("tflite_gzip_bytes", "TFLite gzip (bytes)", "{:,}"),
    ("speed_litert_cpu", "speed LiteRT (audio s/s)", "{:.0f}"),
    ("speed_xnnpack_cpu", "speed XNNPACK (audio s/s)", "{:.0f}"),
    ("speed_builtin_cpu", "speed built-in (audio s/s)", "{:.0f}"),
)


def precision_of(info: dict) -> costs.Precision:
    name = info.get("precision", "float32")
    if name not in costs.PRECISIONS:
        raise UserInputError(f"Unknown precision {name!r} in the model's optimization metadata.")
    if name == "int8" and info.get("edge_weight_bits"):
        return costs.Precision(info.get("weight_bits", 8), 8, info["edge_weight_bits"])
    if name == "int4":
        return costs.Precision(info.get("weight_bits", 4), 8, info.get("edge_weight_bits") or 8)
    return costs.PRECISIONS[name]


def _float_architecture(bundle, info):
    from qn_keras.quartznet_ctc import QuartzNetCTC

    config = info.get("architecture") or bundle.model.get_config()
    if "stackwise_filters" not in config:
        raise UserInputError("The model folder records no QuartzNet architecture.")
    return QuartzNetCTC.from_config(dict(config))


def _kernels(bundle) -> list[np.ndarray]:
    """The kernels the deployed model stores (fake-quantized values for QAT models)."""
    from qn_keras.optimization.quantize import quantized_kernels

    quantized = quantized_kernels(bundle.model)
    if quantized:
        return list(quantized.values())
    out = []
    for layer in bundle.model.layers:
        for attr in costs.KERNEL_ATTRS:
            if getattr(layer, attr, None) is not None:
                out.append(getattr(layer, attr).numpy())
    return out


def evaluate_configuration(
    path,
    utterances_cache,
    manifest,
    *,
    threads: int | None = 1,
    keras: bool = True,
    limit=None,
    engine: str = "auto",
) -> dict:
    """One row of the report for the ``qn optimize`` output (or model folder) at ``path``;
    WER and the audio-per-second figure through the TFLite ``engine``."""
    runtime = (threads, lite.resolve_engine(engine))
    model_dir = resolve_model_dir(path)
    bundle = load_model_dir(model_dir)
    info = bundle.metadata.get(OPTIMIZATION_KEY) or {
        "kind": "float",
        "name": Path(path).name,
        "precision": "float32",
    }
    tflite_path = model_dir / TFLITE_FILE
    if not tflite_path.is_file():
        if info.get("kind") != "float":
            raise UserInputError(
                f"{model_dir} has no {TFLITE_FILE}; run its `qn optimize` job again."
            )
        with tempfile.TemporaryDirectory(prefix="qn-report-") as tmp:
            blob = tflite.convert(bundle.model, "float32", num_features=_num_features(bundle))
            path = tflite.write_tflite(Path(tmp) / TFLITE_FILE, blob)
            return _row(
                bundle, info, model_dir, path, utterances_cache, manifest, runtime, keras, limit
            )
    return _row(
        bundle, info, model_dir, tflite_path, utterances_cache, manifest, runtime, keras, limit
    )


def _num_features(bundle) -> int:
    return bundle.model.inputs[0].shape[-1]


def _row(bundle, info, model_dir, tflite_path, utterances_cache, manifest, runtime, keras, limit):
    threads, engine = runtime
    key = json.dumps(
        [bundle.featurizer.to_dict(), list(bundle.tokenizer.labels), limit], sort_keys=True
    )
    if key not in utterances_cache:
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        cache_dir = utterances_cache.get("_dir", Path(tempfile.gettempdir())) / digest
        utterances_cache[key] = load_features(manifest, bundle, cache_dir, limit=limit)
    utts = utterances_cache[key]

    runner = tflite.TFLiteRunner(tflite_path, num_threads=threads, engine=engine)
    tflite_hyps = transcribe(runner, utts, bundle.tokenizer)
    row = {"name": info.get("name"), "kind": info.get("kind"), "precision": info.get("precision")}
    row.update(score(utts, tflite_hyps))
    if keras:
        keras_hyps = transcribe(keras_logprobs(bundle.model), utts, bundle.tokenizer)
        keras_scores = score(utts, keras_hyps)
        row["keras_wer"], row["keras_cer"] = keras_scores["wer"], keras_scores["cer"]
        row["agreement"] = agreement(tflite_hyps, keras_hyps)

    arch = _float_architecture(bundle, info)
    precision = precision_of(info)
    kernels = _kernels(bundle)
    kernel_total = sum(k.size for k in kernels)
    nonzero = sum(int(np.count_nonzero(k)) for k in kernels)
    macs = costs.layer_macs(arch)
    row.update(
        {
            "params": trainable_parameters(arch),
            "kernel_weights": kernel_total,
            "nonzero_kernel_weights": nonzero,
            "nonzero_kernel_fraction": nonzero / kernel_total if kernel_total else 1.0,
            "weight_bits": precision.weight_bits,
            "edge_weight_bits": precision.edge_weight_bits,
            "activation_bits": precision.activation_bits,
            "memory_mb": costs.memory_bytes(arch, precision) / costs.MB,
            "mmacs": sum(macs.values()) / 1e6,
            "mmacs_16bit": costs.normalized_macs(arch, precision) / 1e6,
            "tflite_bytes": os.path.getsize(tflite_path),
            "tflite_gzip_bytes": prune.gzip_size(tflite_path),
            "tflite_ops": dict(tflite.op_counts(tflite_path)),
            "integer_weighted_ops": _integer_fraction(tflite_path),
            "audio_s_per_s": tflite.audio_seconds_per_second(
                runner, [u.features for u in utts], repeat=3
            ),
            **_speeds(tflite_path, _num_features(bundle), threads),
            "threads": threads,
            "engine": engine,
            "target_sparsity": info.get("target_sparsity"),
            "path": str(model_dir),
        }
    )
    return row


def _speeds(tflite_path, num_features, threads) -> dict:
    out = {}
    engines = (
        ("litert", "xnnpack", "builtin") if lite.litert_available() else ("xnnpack", "builtin")
    )
    for engine in engines:
        result = tflite.speed(
            tflite_path, num_features=num_features, threads=threads or 1, engine=engine
        )
        out[f"speed_{engine}_cpu"] = result["cpu"]
        out[f"speed_{engine}_wall"] = result["wall"]
    return out


def _integer_fraction(tflite_path) -> float:
    ops = tflite.compute_op_types(tflite_path)
    if not ops:
        return 0.0
    return sum(o["input_dtype"] == "int8" for o in ops.values()) / len(ops)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "name" else "---:" for key, _, _ in COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], x_key: str, x_label: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter(row[x_key], 100 * row["wer"], s=30)
        ax.annotate(
            row["name"],
            (row[x_key], 100 * row["wer"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set(xlabel=x_label, ylabel="WER (%)", title=f"WER vs {x_label}")
    if len(rows) > 1 and max(r[x_key] for r in rows) > 4 * min(r[x_key] for r in rows):
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], out_dir, manifest, extra: dict | None = None) -> dict:
    """Writes the Markdown table, the JSON (rows + definitions) and the two plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "manifest": str(manifest),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "definitions": {
            "wer_cer": "greedy CTC through the TFLite model (features in, one utterance at a "
            "time); keras_*: the Keras model (fake-quantized for QAT) on the same features",
            "agreement": "fraction of utterances with identical TFLite and Keras transcripts",
            "memory_mb": "kernels at their stored bit width + other trainable parameters at "
            "32 bits (16 for float16), 10^6 bytes, dense",
            "mmacs": "million multiply-accumulates per second of audio",
            "mmacs_16bit": "sum over layers of MACs * w_bits * a_bits / (16 * 16)",
            "audio_s_per_s": "seconds of audio per wall-clock second through TFLite over the "
            "manifest, one utterance at a time (each new length re-plans the interpreter), "
            "model only (features precomputed), best of 3 passes",
            "speed_*": "seconds of audio per CPU second (_cpu) or wall second (_wall) for a "
            "fixed 5 s input, batch 1, best of 5 x 10 calls; xnnpack: the default delegate, "
            "builtin: TFLite's own kernels only",
        },
        "rows": rows,
        **(extra or {}),
    }
    files.write_json(out_dir / REPORT_JSON, doc)
    md = [
        f"# Optimization report: {manifest}",
        "",
        markdown_table(rows),
        "",
        "WER/CER: greedy, through TFLite. Memory: kernels at stored width, other parameters at "
        "32 bits (16 for float16). MACs per second of audio; 16-bit normalized = "
        "MACs * w_bits * a_bits / 256 per layer. Speed: seconds of audio per CPU second, "
        "TFLite, model only (features precomputed), fixed 5 s input, batch 1, "
        f"{rows[0].get('threads') if rows else '-'} thread(s): the LiteRT runtime (when "
        "installed), TensorFlow's TFLite with its default XNNPACK delegate, and with TFLite's "
        f"built-in kernels. WER through the {rows[0].get('engine') if rows else '-'} engine.",
        "",
    ]
    files.write_text(out_dir / REPORT_MD, "\n".join(md))
    if rows:
        plot(rows, "memory_mb", "memory (MB)", out_dir / PLOT_MEMORY)
        plot(
            rows,
            "mmacs_16bit",
            "MMACs per second of audio (16-bit normalized)",
            out_dir / PLOT_MACS,
        )
    return doc


def run_report(
    configs,
    manifest,
    out_dir,
    *,
    threads: int | None = 1,
    keras: bool = True,
    limit: int | None = None,
    progress: bool = True,
    engine: str = "auto",
) -> dict:
    if not configs:
        raise UserInputError("--configs needs at least one model folder.")
    if not Path(manifest).exists():
        raise FileNotFoundError(f"Manifest not found: {manifest}")
    cache: dict = {"_dir": Path(out_dir) / "cache"}
    rows = []
    iterator = configs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(configs, desc="configurations", unit="model")
    for path in iterator:
        rows.append(
            evaluate_configuration(
                path, cache, manifest, threads=threads, keras=keras, limit=limit, engine=engine
            )
        )
    return write_report(rows, out_dir, manifest)
