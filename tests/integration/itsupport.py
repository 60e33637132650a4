"""Helpers shared by the integration tests: test data, polling, reading the job store."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from orchestrator.schema import Item, Job, RoundScores

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"
#: Labels every test uses; all are words the tiny models' tokenizer knows.
LABELS = ["cat", "dog", "bird", "fish"]
#: Small scoring settings: 4 samples per class first, then 2 per round, at most 12.
FAST = ["--min-scores", "4", "--max-scores", "12", "--samples-per-round", "2"]
#: A p-value cutoff at which the tiny random model prunes some classes (and not others).
PRUNY = ["--p-cutoff", "0.2"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(what: str, why: object) -> None:
    """Skip on a laptop; fail in CI, where the services must be there."""
    msg = f"{what} is not available: {why}"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: integration tests need every service)", pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if pytest itself is killed, so nothing outlives the run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the finalizers still stop it
        pass


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM (a Celery warm shutdown), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def digit_pngs(n: int) -> list[Path]:
    """``n`` distinct 8x8 example PNGs: the first of each digit folder, then the second..."""
    per = [sorted(d.glob("*.png")) for d in sorted(DIGITS.iterdir()) if d.is_dir()]
    out: list[Path] = []
    i = 0
    while len(out) < n:
        for files in per:
            if i < len(files) and len(out) < n:
                out.append(files[i])
        i += 1
    return out


def corrupt_png_bytes(seed: int = 0, n: int = 300) -> bytes:
    """A PNG signature followed by garbage: looks like a PNG, decodes to nothing."""
    return b"\x89PNG\r\n\x1a\n" + random.Random(seed).randbytes(n)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """Poll until ``predicate()`` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def job_of(Session, job_id: int) -> Job:
    with Session() as s:
        job = s.get(Job, job_id)
        assert job is not None, f"no job {job_id} in the database"
        return job


def items_of(Session, job_id: int) -> dict[str, Item]:
    """uri -> item row (detached snapshot)."""
    with Session() as s:
        return {i.uri: i for i in s.scalars(select(Item).where(Item.job_id == job_id))}


def scores_of(Session, item_id: int) -> list[tuple[int, int, np.ndarray]]:
    """[(round, class, float32 errors)] in (round, class) order."""
    from orchestrator.jobs import item_scores

    with Session() as s:
        return item_scores(s, [item_id])[item_id]


def n_score_rows(Session, job_id: int) -> int:
    with Session() as s:
        return s.scalar(select(func.count()).select_from(RoundScores).join(Item, Item.id == RoundScores.item_id)
                        .where(Item.job_id == job_id))


def n_jobs(Session) -> int:
    with Session() as s:
        return s.scalar(select(func.count()).select_from(Job))


def job_finished(Session, job_id: int) -> str | None:
    """The job's status once it is no longer running, else None (for ``wait_for``)."""
    status = job_of(Session, job_id).status
    return None if status == "running" else status
