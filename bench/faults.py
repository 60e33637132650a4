"""Reliability figures: run the fault-injection suite (tests/faults) and print its table.

Every scenario runs a real job (private Redis and Postgres, moto S3, `difflabel worker`
processes, the tiny test model), injects its faults, and checks the invariants against a
fault-free run with the same seed. The rows are written by the tests themselves.

    python bench/faults.py            # writes bench/results/faults.txt
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["scenario", "faults", "items", "lost", "duplicated", "wrong", "failed", "charged", "seconds",
           "to_end"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rows.jsonl"
        env = {**os.environ, "DIFFLABEL_FAULT_REPORT": str(report), "CI": "true", "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults"],
                           cwd=ROOT, env=env)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    lines = ["| " + " | ".join(COLUMNS + ["note"]) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        note = r.get("note", "") or (f"job {r['job_status']}" if r.get("job_status") not in (None, "-") else "")
        lines.append("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + f" | {note} |")
    lines.append(f"\n{len(rows)} scenarios; pytest exit {p.returncode}. 'wrong': labels that differ from the "
                 "fault-free run; 'failed': items recorded as failed with a reason (expected ones only); "
                 "'charged': attempts charged to items; 'seconds': the whole scenario; 'to_end': from the "
                 "fault to the job's end.")
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / "faults.txt"
    out.write_text(text + "\n")
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
