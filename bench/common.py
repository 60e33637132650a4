"""Helpers the throughput benches share: the held-out digits, timing, and result tables.

Every bench prints its table and writes it to ``bench/results/<name>.txt``. Ratios are
measured in one process run, with the two sides interleaved repeat by repeat, so that
load from other processes on the machine falls on both sides alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DIGITS = ROOT / "examples" / "digits"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def one_thread() -> None:
    """One intra-op thread: on the 2-core build machine two torch processes run side by side."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.set_grad_enabled(False)


def digit_files(limit: int | None = None, folder: Path = DIGITS) -> tuple[list[str], list[Path], list[int]]:
    """(labels, files, true class index) of the held-out digits, classes interleaved.

    With ``limit``, the first ``limit`` files taking one from each class in turn, so a
    prefix has every class in equal shares."""
    from orchestrator.sources import class_folders

    classes = class_folders(str(folder))
    labels = [c for c, _ in classes]
    queues = [[Path(f) for f in files] for _, files in classes]
    files, truth = [], []
    depth = max(len(q) for q in queues)
    for j in range(depth):
        for k, q in enumerate(queues):
            if j < len(q):
                files.append(q[j])
                truth.append(k)
    if limit is not None:
        files, truth = files[:limit], truth[:limit]
    return labels, files, truth


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleave(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each side once per repeat, alternating the order; each side returns a rate."""
    rates: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(sides[name]())
    return rates


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of num[i] / den[i] over the repeats."""
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op thread(s)")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    """Print ``text`` and write it to bench/results/<name>.txt."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.txt"
    path.write_text(text.rstrip() + "\n")
    print(text)
    print(f"\nwrote {path.relative_to(ROOT)}", file=sys.stderr)
    return path
