"""The search's results: ``leaderboard.json``, ``leaderboard.md`` and the Pareto plot.

One row per trial, best first: its hyperparameters, parameters, multiply-accumulates per second
of audio, CPU speed (seconds of audio per second; latency is its inverse, in ms of CPU per
second of audio), validation WER and loss, and status: ``completed``, ``infeasible`` (pruned
by a constraint before training), ``diverged`` (NaN loss), ``failed`` or ``running``. The Pareto fronts are the trials
that no other trial beats on both validation WER and parameters (or latency).
"""

from __future__ import annotations

import math

from qn_keras import files

STATUS_ORDER = {"completed": 0, "infeasible": 1, "diverged": 2, "running": 3, "failed": 4}


def pareto_front(points) -> list[bool]:
    """For ``(x, y)`` pairs to minimize, whether each is on the Pareto front: no other point is
    at least as good on both and better on one. Non-finite points are never on it."""
    points = [(float(x), float(y)) for x, y in points]
    finite = [math.isfinite(x) and math.isfinite(y) for x, y in points]
    out = []
    for i, (x, y) in enumerate(points):
        if not finite[i]:
            out.append(False)
            continue
        dominated = any(
            finite[j] and qx <= x and qy <= y and (qx < x or qy < y)
            for j, (qx, qy) in enumerate(points)
            if j != i
        )
        out.append(not dominated)
    return out


def _number(row, key):
    value = row.get(key)
    return float(value) if isinstance(value, int | float) else float("nan")


def rank_rows(rows: list[dict], objective: str) -> list[dict]:
    """Rows best first (completed trials by objective, then the others by trial id), with
    ``rank`` and the two Pareto flags set on completed rows."""

    def key(row):
        score = _number(row, objective)
        return (
            STATUS_ORDER.get(row.get("status"), 9),
            score if row.get("status") == "completed" and math.isfinite(score) else math.inf,
            str(row.get("trial_id")),
        )

    rows = sorted(rows, key=key)
    done = [
        r for r in rows if r.get("status") == "completed" and math.isfinite(_number(r, "val_wer"))
    ]
    for flag, axis in (("pareto_params", "params"), ("pareto_latency", "latency_ms")):
        front = pareto_front([(_number(r, axis), _number(r, "val_wer")) for r in done])
        for row in rows:
            row[flag] = False
        for row, on in zip(done, front, strict=True):
            row[flag] = on
    rank = 0
    for row in rows:
        if row.get("status") == "completed":
            rank += 1
            row["rank"] = rank
        else:
            row["rank"] = None
    return rows


def write_json(path, rows: list[dict], summary: dict):
    payload = {**summary, "trials": rows}
    files.write_json(path, payload)


def _fmt(value, spec):
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    return format(value, spec)


def write_markdown(path, rows: list[dict], summary: dict):
    lines = [
        f"# Architecture search: {summary.get('tuner')} on {summary.get('objective')}",
        "",
        "Trials: "
        + (
            ", ".join(f"{n} {status}" for status, n in (summary.get("counts") or {}).items())
            or "none"
        )
        + ". Search time: "
        f"{_fmt(summary.get('elapsed_seconds'), '.0f')} s. Best: trial "
        f"{summary.get('best_trial_id') or '-'}.",
        "",
        "Speed is seconds of audio per second for a batch-1 CPU forward pass of the model "
        "(featurizer excluded); latency its inverse in ms per second of audio. "
        "Epochs: the trial's budget; steps: optimizer steps it trained. "
        "P = on the Pareto front of WER vs parameters, L = of WER vs latency.",
        "",
        "| rank | trial | architecture | lr | dropout | epochs | steps | params | MMAC/s audio "
        "| speed (x) | latency ms/s | val WER | val loss | status | front |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        hp = row.get("hyperparameters", {})
        front = ("P" if row.get("pareto_params") else "") + (
            "L" if row.get("pareto_latency") else ""
        )
        status = row.get("status", "")
        if row.get("reason"):
            status += f" ({row['reason']})"
        macs = row.get("macs_per_second")
        lines.append(
            "| "
            + " | ".join(
                [
                    str(row.get("rank") or "-"),
                    str(row.get("trial_id")),
                    str(row.get("architecture", "")),
                    _fmt(hp.get("learning_rate"), ".4g"),
                    _fmt(hp.get("dropout"), ".2f"),
                    _fmt(row.get("epochs"), "d"),
                    _fmt(row.get("steps"), "d"),
                    _fmt(row.get("params"), ",d"),
                    _fmt(macs / 1e6 if isinstance(macs, int | float) else None, ",.1f"),
                    _fmt(row.get("speed"), ".1f"),
                    _fmt(row.get("latency_ms"), ".2f"),
                    _fmt(row.get("val_wer"), ".2%"),
                    _fmt(row.get("val_loss"), ".2f"),
                    status,
                    front,
                ]
            )
            + " |"
        )
    files.write_text(path, "\n".join(lines) + "\n")


def write_plot(path, rows: list[dict], title: str = "") -> bool:
    """Validation WER against parameters and against CPU latency, Pareto fronts marked.
    Returns False (and writes nothing) when no trial has a validation WER yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [
        r for r in rows if r.get("status") == "completed" and math.isfinite(_number(r, "val_wer"))
    ]
    if not done:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (
        ("params", "pareto_params", "trainable parameters", True),
        ("latency_ms", "pareto_latency", "CPU latency (ms per second of audio, batch 1)", False),
    )
    for ax, (key, flag, label, log_x) in zip(axes, panels, strict=True):
        xs = [_number(r, key) for r in done]
        ys = [100.0 * _number(r, "val_wer") for r in done]
        ax.scatter(xs, ys, color="tab:blue", alpha=0.6, label="trial")
        for r, x, y in zip(done, xs, ys, strict=True):
            ax.annotate(
                str(r["trial_id"]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7
            )
        front = sorted((x, y) for r, x, y in zip(done, xs, ys, strict=True) if r.get(flag))
        if front:
            ax.step(
                [p[0] for p in front],
                [p[1] for p in front],
                where="post",
                color="tab:red",
                linewidth=1.5,
            )
            ax.scatter(
                [p[0] for p in front],
                [p[1] for p in front],
                color="tab:red",
                marker="*",
                s=120,
                label="Pareto front",
                zorder=3,
            )
        if log_x and min(xs) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation WER (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True
