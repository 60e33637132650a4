"""Evaluations per image at the default settings against the paper's one-sample-per-step
Algorithm 1: the extra cost of coarser rounds (issue 6, benchmark 3).

Clark & Jaini's Algorithm 1 adds one sample to every surviving class per step and runs the
t-test after each. difflabel brings every class to ``min_scores`` in its first round and then
adds ``max(samples_per_round, round_growth x samples so far)`` per round (defaults 2 and
1/8), so that an item's rows fill model calls and a distributed job needs fewer round tasks
(an item that runs to ``max_scores``: about 50 instead of 2,000). Coarser rounds can only prune later, never
sooner: the extra evaluations are the price. Both are run here on the demo model's held-out
scans with the classifier itself (``classify_tensors``), everything else at the defaults.

    python bench/round_cost.py [--limit 719] [--rounds 1:0,2:0,2:0.125,4:0]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import digit_files, machine, markdown_table, one_thread, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="images (default: all 719)")
    ap.add_argument("--rounds", default="1:0,2:0,2:0.125,4:0",
                    help="samples_per_round:round_growth pairs to compare; 1:0 is Algorithm 1")
    args = ap.parse_args()
    one_thread()
    import numpy as np

    from worker.backends import load_backend
    from worker.classifier import classify_tensors
    from worker.config import ScoringConfig
    from worker.images import decode
    from worker.labels import prompts
    from worker.noise import content_key

    backend = load_backend("demo", device="cpu")
    labels, files, truth = digit_files(args.limit)
    blobs = [f.read_bytes() for f in files]
    keys = [content_key(b) for b in blobs]
    x0 = backend.encode_images([decode(b) for b in blobs])
    cond = backend.encode_prompts(prompts(backend.default_template, labels))
    default = ScoringConfig()
    sizes = [(int(a), float(b)) for a, b in (s.split(":") for s in args.rounds.split(","))]
    runs = {}
    for n in sizes:
        cfg = replace(default, samples_per_round=n[0], round_growth=n[1])
        t0 = time.perf_counter()
        res = classify_tensors(backend, keys, x0, cond, labels, cfg)
        evals = np.array([r.n_evals for r in res])
        runs[n] = dict(acc=float(np.mean([r.class_index == t for r, t in zip(res, truth)])),
                       mean=float(evals.mean()), median=float(np.median(evals)), p99=float(np.percentile(evals, 99)),
                       rounds=float(np.mean([r.rounds for r in res])), max_rounds=max(r.rounds for r in res),
                       secs=time.perf_counter() - t0)
        print(f"samples/round, growth {n}: {runs[n]}", file=sys.stderr)
    base = runs[(1, 0.0)]["mean"] if (1, 0.0) in runs else None
    rows = []
    for n in sizes:
        r = runs[n]
        extra = f"{(r['mean'] / base - 1) * 100:+.1f}%" if base else "-"
        name = ("Algorithm 1" if n == (1, 0.0) else "default"
                if n == (default.samples_per_round, default.round_growth) else "")
        rows.append((f"{n[0]}", f"{n[1]:g}", name,
                     f"{r['acc'] * 100:.2f}", f"{r['mean']:.1f}", f"{r['median']:.0f}", f"{r['p99']:.0f}",
                     extra, f"{r['rounds']:.1f}", r["max_rounds"], f"{r['secs']:.0f}"))
    table = markdown_table(("samples per round after the first", "round growth", "", "accuracy %", "evals/image mean", "median",
                            "99th pct", "extra evals vs Algorithm 1", "rounds/image mean", "max rounds",
                            "seconds"), rows)
    text = (f"Round size: {len(files)} held-out digits, demo model; min_scores {default.min_scores}, "
            f"p_cutoff {default.p_cutoff}, max_scores {default.max_scores}; {machine()}\n"
            f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n\n{table}\n\n"
            "Each row draws its own noise (noise is seeded by round index), so accuracy differences "
            "between rows of a few scans are sampling noise, not an effect of the round size.\n")
    write_result("round_cost", text)


if __name__ == "__main__":
    main()
