"""Reproduce Clark & Jaini (2023) Figure 2 on the demo model: accuracy vs evaluations.

Three estimators on the held-out digits (examples/digits):
  (a) independent noise per class, fixed budget of n samples per class;
  (b) shared noise (same t_j, eps_j for every class), fixed budget;
  (c) shared noise with paired t-test pruning, at several (min_scores, p_cutoff).
Fixed-budget curves use prefixes of one draw of N stratified-then-shuffled samples per
image (each prefix is a uniform random subset of the strata, so i.i.d.-like in t).
Also prints a logistic-regression baseline on the same split.

    python bench/figure2.py [--model demo] [--folder examples/digits] [--n 64]

Prints a table, writes bench/results/figure2.png and figure2.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.sources import class_folders  # noqa: E402
from worker.backends import load_backend  # noqa: E402
from worker.classifier import classify_tensors  # noqa: E402
from worker.config import ScoringConfig  # noqa: E402
from worker.images import decode  # noqa: E402
from worker.labels import prompts  # noqa: E402
from worker.noise import content_key  # noqa: E402
from worker.scoring import RoundRequest, score_round  # noqa: E402

BUDGETS = (1, 2, 3, 5, 8, 10, 16, 20, 32, 40, 64)
#: (min_scores, p_cutoff, samples_per_round): the paper's defaults, difflabel's defaults, two others.
PRUNING = ((20, 2e-3, 4), (5, 2e-2, 2), (5, 1e-2, 1), (3, 5e-2, 1))


def score_matrix(backend, x0, cond, keys, n, config, chunk=32):
    """(I, K, n) errors: every class on n samples of round 0."""
    K = cond.shape[0]
    out = []
    for s in range(0, len(keys), chunk):
        reqs = [RoundRequest(keys[i], x0[i], list(range(K)), 0, n) for i in range(s, min(s + chunk, len(keys)))]
        out += score_round(backend, reqs, cond, config)
    return np.stack(out)


def budget_curve(S, truth):
    return {n: float(np.mean(S[:, :, :n].mean(2).argmin(1) == truth)) for n in BUDGETS if n <= S.shape[2]}


def logistic_baseline() -> float | None:
    try:
        from sklearn.linear_model import LogisticRegression

        from worker import demo
    except ImportError:
        return None
    s = demo.load_split()
    x_tr = np.concatenate([s.train_x, s.val_x]).reshape(-1, 64) / 16
    y_tr = np.concatenate([s.train_y, s.val_y])
    clf = LogisticRegression(max_iter=5000).fit(x_tr, y_tr)
    return float(clf.score(s.test_x.reshape(-1, 64) / 16, s.test_y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--folder", default=str(ROOT / "examples" / "digits"))
    ap.add_argument("--n", type=int, default=64, help="largest fixed budget per class")
    ap.add_argument("--limit", type=int, default=None, help="images per class (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    backend = load_backend(args.model, device=args.device)
    classes = class_folders(args.folder)
    labels = [c for c, _ in classes]
    paths, truth = [], []
    for k, (_, files) in enumerate(classes):
        files = files[: args.limit] if args.limit else files
        paths += files
        truth += [k] * len(files)
    truth = np.array(truth)
    blobs = [Path(p).read_bytes() for p in paths]
    keys = [content_key(b) for b in blobs]  # the same noise `difflabel eval` uses
    x0 = backend.encode_images([decode(b) for b in blobs])
    cond = backend.encode_prompts(prompts(backend.default_template or "a photo of a {}.", labels))
    K = len(labels)
    print(f"{len(paths)} images, {K} classes, model {args.model}", file=sys.stderr)

    rows, timings = {}, {}
    for name, cfg in (("shared", ScoringConfig()), ("independent", ScoringConfig(shared_noise=False)),
                      ("shared-uniform", ScoringConfig(weighting="uniform"))):
        t0 = time.perf_counter()
        S = score_matrix(backend, x0, cond, keys, args.n, cfg)
        timings[name] = time.perf_counter() - t0
        rows[name] = budget_curve(S, truth)
        print(f"  {name}: {S.size} evals in {timings[name]:.0f} s ({S.size / timings[name]:.0f}/s)",
              file=sys.stderr)

    pruned = []
    for min_scores, p_cutoff, per_round in PRUNING:
        cfg = ScoringConfig(min_scores=min_scores, p_cutoff=p_cutoff, samples_per_round=per_round)
        t0 = time.perf_counter()
        res = classify_tensors(backend, keys, x0, cond, labels, cfg)
        acc = float(np.mean([r.class_index == t for r, t in zip(res, truth)]))
        evals = float(np.mean([r.n_evals for r in res]))
        pruned.append({"min_scores": min_scores, "p_cutoff": p_cutoff, "samples_per_round": per_round,
                       "accuracy": acc, "evals_per_image": evals, "evals_per_class": evals / K,
                       "seconds": time.perf_counter() - t0})
        print(f"  pruning {min_scores}/{p_cutoff}/{per_round}: {acc:.4f} at {evals:.1f} evals",
              file=sys.stderr)
    baseline = logistic_baseline()

    print(f"\nFixed budget: accuracy (%) by samples per class ({len(paths)} images, {K} classes)")
    print("| samples/class | evals/image | " + " | ".join(rows) + " | shared - independent |")
    print("|---|---|" + "---|" * (len(rows) + 1))
    for n in rows["shared"]:
        vals = [rows[m][n] * 100 for m in rows]
        print(f"| {n} | {n * K} | " + " | ".join(f"{v:.1f}" for v in vals)
              + f" | {vals[0] - vals[1]:+.1f} |")
    best_n = max(rows["shared"], key=lambda n: (round(rows["shared"][n], 4), -n))
    full = rows["shared"][best_n]
    print(f"\nPruning (shared noise, paired t-test); reference: shared noise without pruning "
          f"peaks at {full * 100:.1f}% with {best_n * K} evals/image")
    print("| min_scores | p_cutoff | samples/round | accuracy % | evals/image | evals/class | "
          "evals vs unpruned peak | within 1 pt |")
    print("|---|---|---|---|---|---|---|---|")
    for p in pruned:
        ratio = p["evals_per_image"] / (best_n * K)
        print(f"| {p['min_scores']} | {p['p_cutoff']:g} | {p['samples_per_round']} | "
              f"{p['accuracy'] * 100:.1f} | {p['evals_per_image']:.1f} | {p['evals_per_class']:.1f} | "
              f"{ratio:.3f} (1/{1 / ratio:.1f}) | {'yes' if p['accuracy'] >= full - 0.01 else 'no'} |")
    if baseline is not None:
        print(f"\nLogistic regression on raw pixels (train+val, same split): {baseline * 100:.1f}%")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figure2.json").write_text(json.dumps({
        "n_images": len(paths), "classes": K, "fixed_budget": rows, "pruning": pruned,
        "logistic_regression": baseline, "seconds": timings}, indent=2) + "\n")
    plot(rows, pruned, K, out / "figure2.png", len(paths))
    print(f"\nwrote {out / 'figure2.png'} and {out / 'figure2.json'}")


def plot(rows, pruned, K, path, n_images):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, style in (("independent", "s--"), ("shared", "o-"), ("shared-uniform", "^:")):
        xs = list(rows[name])
        ax.plot(xs, [rows[name][n] * 100 for n in xs], style, label=f"{name} noise, no pruning")
    ax.plot([p["evals_per_class"] for p in pruned], [p["accuracy"] * 100 for p in pruned], "r*",
            markersize=11, label="shared noise + t-test pruning")
    for p in pruned:
        ax.annotate(f"{p['min_scores']}/{p['p_cutoff']:g}", (p["evals_per_class"], p["accuracy"] * 100),
                    fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations per class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"digits demo model, {n_images} held-out images, {K} classes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
