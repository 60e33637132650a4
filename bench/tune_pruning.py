"""Sweep the pruning rule's parameters on a labelled folder (the validation slice by default).

Scores every class of every image once on N shared-noise samples, then replays the
round/prune logic (worker.rounds.ItemRounds, the code both executors use) on prefixes of
those samples for each (min_scores, p_cutoff, samples_per_round). Cheap: one pass of
model calls serves the whole sweep. Used to choose the defaults; the chosen setting is
then measured for real on the held-out folder with `difflabel eval`.

    python bench/tune_pruning.py [--folder examples/digits-val] [--n 64]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.figure2 import score_matrix  # noqa: E402
from orchestrator.sources import class_folders  # noqa: E402
from worker.backends import load_backend  # noqa: E402
from worker.config import ScoringConfig  # noqa: E402
from worker.images import decode  # noqa: E402
from worker.labels import prompts  # noqa: E402
from worker.noise import content_key  # noqa: E402
from worker.rounds import ItemRounds  # noqa: E402


def replay(S: np.ndarray, cfg: ScoringConfig) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and evaluations per image, consuming sample columns in order."""
    I, K, N = S.shape
    pred, evals = np.zeros(I, int), np.zeros(I, int)
    for i in range(I):
        st = ItemRounds(K)
        while (n := st.plan(cfg)) > 0:
            lo = st.scored
            hi = min(lo + n, N)
            if hi <= lo:
                break
            st.record(list(st.survivors), S[i, st.survivors, lo:hi], cfg)
        pred[i], evals[i] = st.winner(), st.n_evals
    return pred, evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--folder", default=str(ROOT / "examples" / "digits-val"))
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    backend = load_backend(args.model)
    classes = class_folders(args.folder)
    labels = [c for c, _ in classes]
    paths = [f for _, files in classes for f in files]
    truth = np.array([k for k, (_, files) in enumerate(classes) for _ in files])
    blobs = [Path(p).read_bytes() for p in paths]
    x0 = backend.encode_images([decode(b) for b in blobs])
    cond = backend.encode_prompts(prompts(backend.default_template or "a photo of a {}.", labels))
    S = score_matrix(backend, x0, cond, [content_key(b) for b in blobs], args.n, ScoringConfig())
    K = len(labels)
    print(f"{len(paths)} images from {args.folder}, {K} classes, {args.n} shared samples per class")
    print(f"no pruning, all {args.n} samples: {np.mean(S.mean(2).argmin(1) == truth) * 100:.1f}% "
          f"at {args.n * K} evals/image")
    print("| min_scores | p_cutoff | samples/round | accuracy % | evals/image | max evals |")
    print("|---|---|---|---|---|---|")
    for m, p, r in itertools.product((2, 3, 4, 5, 6, 8, 10, 20), (2e-3, 1e-2, 2e-2, 5e-2), (1, 2, 4)):
        cfg = ScoringConfig(min_scores=m, p_cutoff=p, samples_per_round=r, max_scores=args.n)
        pred, ev = replay(S, cfg)
        print(f"| {m} | {p:g} | {r} | {np.mean(pred == truth) * 100:.1f} | {ev.mean():.1f} | {ev.max()} |")


if __name__ == "__main__":
    main()
