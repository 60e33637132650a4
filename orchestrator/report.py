"""Formatting results for people (tables) and scripts (JSON), and evaluation summaries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_rows(rows: list[dict[str, Any]], output: str) -> None:
    """Per-item results as a table, a JSON array or JSON lines."""
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
    elif output == "jsonl":
        for r in rows:
            click.echo(json.dumps(r))
    else:
        body = [[r["uri"], r["label"] if r["status"] == "done" else "FAILED", r["confidence"],
                 r["margin"], r["n_evals"], r.get("error") or ""] for r in rows]
        click.echo(table(["image", "label", "confidence", "margin", "evals", "error"], body))


def evaluation(labels: Sequence[str], pairs: Sequence[tuple[Any, str]], n_failed: int) -> dict[str, Any]:
    """Summary of (result or None, true label) pairs: accuracy, evals, ECE, confusion."""
    import numpy as np  # here, not at the top: `difflabel status` should not pay for it

    from worker.calibration import expected_calibration_error

    done = [(r, t) for r, t in pairs if r is not None]
    index = {lab: i for i, lab in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for r, t in done:
        confusion[index[t], index[r.label]] += 1
    correct = [r.label == t for r, t in done]
    evals = np.array([r.n_evals for r, _ in done], dtype=float)
    conf = [r.confidence for r, _ in done]
    k = len(labels)
    return {
        "n_images": len(pairs),
        "n_failed": n_failed,
        "accuracy": float(np.mean(correct)) if correct else 0.0,
        "mean_evals_per_image": float(evals.mean()) if len(evals) else 0.0,
        "median_evals_per_image": float(np.median(evals)) if len(evals) else 0.0,
        "mean_evals_per_class": float(evals.mean() / k) if len(evals) else 0.0,
        "ece": expected_calibration_error(conf, correct),
        "mean_confidence": float(np.mean(conf)) if conf else 0.0,
        "labels": list(labels),
        "confusion": confusion.tolist(),
        "per_image": [{"uri": r.key, "truth": t, "label": r.label, "n_evals": r.n_evals,
                       "confidence": r.confidence} for r, t in done],
    }


def print_eval(s: dict[str, Any]) -> None:
    click.echo(f"images        {s['n_images']}  (failed to read: {s['n_failed']})")
    click.echo(f"accuracy      {s['accuracy'] * 100:.2f}%")
    click.echo(f"evaluations   mean {s['mean_evals_per_image']:.1f} / median "
               f"{s['median_evals_per_image']:.0f} per image  "
               f"({s['mean_evals_per_class']:.1f} per class)")
    cal = "calibrated" if s.get("calibrated") else "uncalibrated"
    click.echo(f"ECE           {s['ece']:.4f}  ({cal}; mean confidence {s['mean_confidence']:.3f})")
    click.echo("confusion (rows: truth, columns: predicted)")
    labels = s["labels"]
    click.echo(table(["truth"] + labels, [[lab] + row for lab, row in zip(labels, s["confusion"])]))


def plot_eval(s: dict[str, Any], path: str) -> None:
    """Accuracy of images grouped by the evaluations per class they needed."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(s["labels"])
    per = s["per_image"]
    x = np.array([p["n_evals"] / k for p in per])
    ok = np.array([p["label"] == p["truth"] for p in per], dtype=float)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, 9))) if len(x) else np.array([0, 1])
    centers, acc, counts, lows, widths = [], [], [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (x >= lo) & ((x < hi) | (hi == edges[-1]) & (x <= hi))
        if m.any():
            centers.append(x[m].mean())
            acc.append(ok[m].mean() * 100)
            counts.append(int(m.sum()))
            lows.append(lo)
            widths.append(max(hi - lo, 0.2))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax2 = ax.twinx()
    ax2.bar(lows, counts, width=widths, align="edge", alpha=0.2, color="gray", edgecolor="white")
    ax2.set_ylabel("images per bin")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot(centers, acc, "o-", label="accuracy")
    ax.set_xlabel("model evaluations per class (image's own cost)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy {s['accuracy'] * 100:.1f}% over {len(per)} images; "
                 f"mean {s['mean_evals_per_class']:.1f} evals/class")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def progress(total: int | None, desc: str, enabled: bool = True, unit: str = "img"):
    """A tqdm bar on stderr: hidden with --no-progress, and when stderr is not a terminal."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled else True,
                dynamic_ncols=True, leave=False)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def print_status(s: dict[str, Any], stream=None) -> None:
    """The human view of `difflabel status`."""
    echo = (lambda t: click.echo(t, file=stream)) if stream else click.echo
    total = max(s["items"], 1)
    echo(f"job {s['job']}{' (' + s['name'] + ')' if s.get('name') else ''}: {s['status']}  "
         f"{s['source']}  model {s['model']}")
    echo(f"  items      {s['items']}: done {s['done']}, failed {s['failed']}, remaining {s['remaining']}"
         + (f", cancelled {s['cancelled']}" if s.get("cancelled") else "")
         + f"  ({100 * s['finished'] / total:.1f}% finished; {s['skipped_objects']} non-image objects skipped)")
    if "evaluations" in s:
        echo(f"  evals      {s['evaluations']:,} spent; {s['evals_per_finished_item']:.1f} per labelled item; "
             f"{s['surviving_classes']:.2f} of {s['classes']} classes surviving on average in unfinished items")
        if s.get("survivors_histogram"):
            bins = ", ".join(f"{k}: {n}" for k, n in s["survivors_histogram"].items())
            echo(f"  survivors  unfinished items by classes left ({bins})")
        if s.get("in_flight"):
            echo(f"  in flight  {s['in_flight']} items leased to workers now")
        if s["status"] == "running":
            echo(f"  throughput {s['items_per_second']:.2f} items/s  ETA {_duration(s['eta_seconds'])}")
        if s.get("workers"):
            _print_workers(s["workers"], s["status"] == "running", echo)


#: Workers listed by `status` (most recently seen first); the JSON output has them all.
MAX_WORKER_LINES = 20


def _print_workers(workers: list[dict[str, Any]], running: bool, echo) -> None:
    """One line per worker: its totals on the job, its rates and when it was last seen.
    While the job runs, the rates are over the last minute; afterwards, over its time on it."""
    key = "" if running else "mean_"
    echo(f"  workers    {len(workers)}; rates {'over the last minute' if running else 'while it worked'}")
    rows = [[f"{w['node'] or '-'} (pid {_pid(w['worker'])})", w["items_done"], w["items_failed"],
             f"{w['evaluations']:,}", f"{w[key + 'items_per_second']:.2f}", f"{w[key + 'evals_per_second']:.1f}",
             f"{_duration(w['seen_seconds_ago'])} ago"] for w in workers[:MAX_WORKER_LINES]]
    body = table(["worker", "done", "failed", "evals", "items/s", "evals/s", "last seen"], rows)
    for line in body.splitlines():
        echo("    " + line)
    if len(workers) > MAX_WORKER_LINES:
        echo(f"    ... and {len(workers) - MAX_WORKER_LINES} more (-o json lists them all)")


def _pid(worker: str) -> str:
    """The process id in a lease holder's name (host:pid:random)."""
    parts = worker.split(":")
    return parts[-2] if len(parts) >= 3 else worker
