"""bench/families_gpu.py, the per-family step of bench/gpu.sh, stays runnable without a GPU:
its --cpu-smoke path runs every family's adapter and scoring loop on tiny configs, and the
published configs it builds on the GPU have the published parameter counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_scores_every_family(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "families_gpu.py"), "--cpu-smoke", "--calls", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "families_smoke.json").read_text())
    from bench.families_gpu import FAMILIES

    assert list(data) == list(FAMILIES)
    for name, fam in data.items():
        assert [b["batch"] for b in fam["batches"]] == list(FAMILIES[name]["batches"][1]), name
        assert all(b["evals"] >= b["batch"] and b["evals_per_s"] > 0 for b in fam["batches"]), name
    text = (tmp_path / "families_smoke.txt").read_text()
    assert "CPU SMOKE" in text and text.count("(tiny config)") == sum(len(f["batches"]) for f in data.values())


def test_published_configs_have_published_sizes():
    import torch

    from bench.families_gpu import FAMILIES, check_sizes

    torch.set_num_threads(1)
    for name, n in check_sizes():
        assert abs(n - FAMILIES[name]["published"]) / FAMILIES[name]["published"] < 0.01, (name, n)

