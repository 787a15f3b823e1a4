"""``qn lm tune``: the LM weight (alpha) and word bonus (beta) that minimise WER on a dev set.

The model runs once; its log-probs go to a scratch ``.npy`` file that worker processes map
read-only, and the grid's cells are decoded in parallel, one process per core (processes,
not threads: the search is Python and holds the GIL). Workers are started with ``spawn`` and
import no TensorFlow. The table, a heatmap and the best setting are written into the LM
folder, each file atomically; ``--lm DIR`` then decodes with the best setting by default.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qn_keras import files
from qn_keras.errors import UserInputError
from qn_keras.lm.folder import DECODER_JSON, TUNING_CSV, TUNING_PNG, load_lm_folder
from qn_keras.metrics import char_errors, word_errors


def parse_grid(spec: str, name: str) -> list[float]:
    """``A:B:STEP`` (both ends included), ``A,B,C`` or ``A``."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(np.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserInputError(
            f"--{name} must be A:B:STEP (A <= B, STEP > 0), A,B,C or A; got {spec!r}"
        ) from None
    if not values or not all(np.isfinite(values)):
        raise UserInputError(f"--{name}: no finite values in {spec!r}")
    if len(values) > 200:
        raise UserInputError(f"--{name}: {len(values)} values; at most 200")
    return values


@dataclasses.dataclass
class TuneResult:
    rows: list  # dicts: alpha, beta, wer, cer, seconds
    best: dict
    greedy: dict
    utterances: int
    audio_seconds: float


# Worker state, set once per process by _init_worker (spawned processes share nothing).
_WORKER: dict = {}


def _init_worker(labels, lm_dir, settings, logprobs_file, lengths, references):
    from qn_keras.lm.decoder import LMDecoder

    flat = np.load(logprobs_file, mmap_mode="r")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    _WORKER.update(
        decoder=LMDecoder(labels, lm_dir, settings),
        logprobs=[flat[bounds[i] : bounds[i + 1]] for i in range(len(lengths))],
        references=references,
    )


def _score_cell(cell: tuple[float, float]) -> dict:
    alpha, beta = cell
    decoder = _WORKER["decoder"]
    decoder.set_weights(alpha, beta)
    started = time.monotonic()
    we = wn = ce = cn = 0
    for logprobs, reference in zip(_WORKER["logprobs"], _WORKER["references"], strict=True):
        hypothesis = decoder.decode(np.asarray(logprobs)).text
        e, n = word_errors(reference, hypothesis)
        we, wn = we + e, wn + n
        e, n = char_errors(reference, hypothesis)
        ce, cn = ce + e, cn + n
    return {
        "alpha": alpha,
        "beta": beta,
        "wer": we / max(wn, 1),
        "cer": ce / max(cn, 1),
        "seconds": round(time.monotonic() - started, 3),
    }


def tune_grid(
    logprobs: Sequence[np.ndarray],
    references: Sequence[str],
    labels: Sequence[str],
    lm_dir,
    alphas: Sequence[float],
    betas: Sequence[float],
    settings=None,
    processes: int | None = None,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """WER and CER of every (alpha, beta) over precomputed log-probs, in parallel."""
    from qn_keras.lm.decoder import DecoderSettings, LMDecoder

    if not logprobs:
        raise UserInputError("No utterances to tune on.")
    settings = settings or DecoderSettings()
    # Fail here, in this process, on a bad LM folder or labels, not in every worker.
    LMDecoder(labels, lm_dir, settings)
    cells = [(float(a), float(b)) for a in alphas for b in betas]
    processes = max(1, min(processes or os.cpu_count() or 1, len(cells)))
    lengths = [len(lp) for lp in logprobs]
    with tempfile.TemporaryDirectory(prefix="qn-lm-tune-") as scratch:
        flat_file = Path(scratch) / "logprobs.npy"
        np.save(flat_file, np.concatenate([np.asarray(lp, np.float32) for lp in logprobs]))
        init = (list(labels), str(lm_dir), settings, str(flat_file), lengths, list(references))
        rows = []
        if processes == 1:
            _init_worker(*init)
            for cell in cells:
                rows.append(_score_cell(cell))
                if progress:
                    progress(rows[-1])
            return rows
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes, initializer=_init_worker, initargs=init) as pool:
            for row in pool.imap(_score_cell, cells):
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def best_row(rows: Sequence[dict]) -> dict:
    """Lowest WER; ties by CER, then the smaller LM weight and bonus (the milder setting)."""
    return min(rows, key=lambda r: (round(r["wer"], 9), round(r["cer"], 9), r["alpha"], r["beta"]))


def write_table(path: Path, rows: Sequence[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["alpha", "beta", "wer", "cer", "seconds"])
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r["alpha"], r["beta"])):
        writer.writerow({k: (f"{v:.6f}" if k in ("wer", "cer") else v) for k, v in row.items()})
    files.write_text(path, out.getvalue())


def plot_heatmap(path: Path, rows: Sequence[dict], best: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in rows})
    betas = sorted({r["beta"] for r in rows})
    grid = np.full((len(alphas), len(betas)), np.nan)
    for r in rows:
        grid[alphas.index(r["alpha"]), betas.index(r["beta"])] = 100 * r["wer"]
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.6 + 0.7 * len(betas)), max(3.5, 1.6 + 0.5 * len(alphas)))
    )
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("beta (word bonus)")
    ax.set_ylabel("alpha (LM weight)")
    if grid.size <= 400:
        for i in range(len(alphas)):
            for j in range(len(betas)):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    ax.scatter(
        [betas.index(best["beta"])], [alphas.index(best["alpha"])], marker="s", s=260,
        facecolors="none", edgecolors="red", linewidths=2,
    )  # fmt: skip
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="WER %")
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_results(lm_dir, result: TuneResult, settings, source: dict) -> dict:
    """tuning.csv, tuning.png and decoder.json (the best setting) in the LM folder."""
    lm_dir = Path(lm_dir)
    load_lm_folder(lm_dir)  # still there and usable
    write_table(lm_dir / TUNING_CSV, result.rows)
    best = result.best
    title = (
        f"WER % over alpha x beta, beam {settings.beam_width}, {result.utterances} utterances\n"
        f"best {100 * best['wer']:.1f}% at alpha {best['alpha']:g}, beta {best['beta']:g} "
        f"(greedy {100 * result.greedy['wer']:.1f}%)"
    )
    plot_heatmap(lm_dir / TUNING_PNG, result.rows, best, title)
    decoder = {
        "alpha": best["alpha"],
        "beta": best["beta"],
        "beam_width": int(settings.beam_width),
        "beam_prune_logp": float(settings.beam_prune_logp),
        "token_min_logp": float(settings.token_min_logp),
        "tuned_on": {
            **source,
            "utterances": result.utterances,
            "audio_seconds": round(result.audio_seconds, 2),
            "wer": best["wer"],
            "cer": best["cer"],
            "greedy_wer": result.greedy["wer"],
            "greedy_cer": result.greedy["cer"],
            "grid_cells": len(result.rows),
        },
    }
    files.write_json(lm_dir / DECODER_JSON, decoder)
    return decoder
