"""Choose the 10-label pruning defaults by cross-validation on the digits training split.

The held-out scans (examples/digits) are never used here, and the validation slice alone is
too easy to tell settings apart. So: split the 970 training images into 5 stratified folds
(random_state 0); for some folds, train a model with the shipped recipe on the other four
folds and score the fold it never saw. Those out-of-sample items, plus the validation slice
scored by the shipped model, form the tuning set.

Every tuning item is scored once on N shared-noise samples per class (a bank); then each
candidate rule is replayed on the bank through worker.rounds.ItemRounds, the code both
executors run (bench/tune_pruning.py's replay). The rule to ship is chosen by a criterion
fixed before looking: the fewest evaluations per image among the settings that change no
decision of the unpruned N-sample classifier on the tuning set, nor lose accuracy against it.

    python bench/cv_defaults.py train --fold 0      # ~25-40 min per fold on one core
    python bench/cv_defaults.py bank                 # scores every trained fold + validation
    python bench/cv_defaults.py sweep                # the table and the choice
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tune_pruning import replay  # noqa: E402
from worker.config import ScoringConfig  # noqa: E402

FOLDS = 5
RUNS = ROOT / "runs" / "cv_digits"
OUT = ROOT / "bench" / "results" / "cv_defaults.txt"


def folds() -> list[np.ndarray]:
    from sklearn.model_selection import StratifiedKFold

    from worker import demo
    split = demo.load_split()
    skf = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=0)
    return [test for _, test in skf.split(split.train_x, split.train_y)]


def cmd_train(args) -> None:
    import torch

    from worker import demo
    from worker.training import TrainConfig
    torch.set_num_threads(args.threads)
    held = folds()[args.fold]
    n = len(demo.load_split().train_y)
    keep = np.setdiff1d(np.arange(n), held)
    out = RUNS / f"fold{args.fold}"
    t0 = time.perf_counter()
    meta = demo.train_digits(out, TrainConfig(steps=3000, batch_size=128, seed=0, threads=args.threads),
                             subset=keep)
    (out / "heldout.json").write_text(json.dumps(held.tolist()))
    print(f"fold {args.fold}: trained on {len(keep)}, holds out {len(held)}; "
          f"final loss {meta['training']['final_loss']:.4f}; {time.perf_counter() - t0:.0f} s")


def _score(model: str, x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """(I, 10, n) errors of every digit class on n shared samples, as the engine scores them."""
    from bench.figure2 import score_matrix
    from worker import demo
    from worker.backends import load_backend
    from worker.images import decode
    from worker.labels import prompts
    from worker.noise import content_key
    import io

    from PIL import Image
    backend = load_backend(model)
    u8 = np.rint(x.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
    blobs = []
    for img in u8:  # the same PNG bytes (hence the same noise keys) a user's files would give
        buf = io.BytesIO()
        Image.fromarray(img, "L").save(buf, format="PNG", optimize=True)
        blobs.append(buf.getvalue())
    x0 = backend.encode_images([decode(b) for b in blobs])
    cond = backend.encode_prompts(prompts(backend.default_template or "a photo of a {}.", list(demo.DIGIT_NAMES)))
    return score_matrix(backend, x0, cond, [content_key(b) for b in blobs], n, ScoringConfig())


def cmd_bank(args) -> None:
    import torch

    from worker import demo
    torch.set_num_threads(1)
    split = demo.load_split()
    parts, truths, names = [], [], []
    for d in sorted(RUNS.glob("fold*")):
        if not (d / "heldout.json").exists():
            continue
        held = np.array(json.loads((d / "heldout.json").read_text()))
        t0 = time.perf_counter()
        parts.append(_score(str(d), split.train_x[held], split.train_y[held], args.n))
        truths.append(split.train_y[held])
        names += [f"{d.name}"] * len(held)
        print(f"{d.name}: {len(held)} items scored in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    parts.append(_score("demo", split.val_x, split.val_y, args.n))
    truths.append(split.val_y)
    names += ["validation"] * len(split.val_y)
    print(f"validation: {len(split.val_y)} items scored in {time.perf_counter() - t0:.0f} s", flush=True)
    np.savez_compressed(RUNS / "bank.npz", S=np.concatenate(parts), truth=np.concatenate(truths),
                        source=np.array(names))


CANDIDATES = (
    [("ttest", m, p, r) for m, p, r in itertools.product((2, 3, 4, 5), (2e-3, 5e-3, 1e-2, 2e-2, 5e-2), (1, 2))]
    + [("pooled", m, p, r) for m, p, r in itertools.product((2, 3), (2e-3, 5e-3, 1e-2, 2e-2, 5e-2), (1, 2))]
)


def cmd_sweep(args) -> None:
    z = np.load(RUNS / "bank.npz")
    S, truth, source = z["S"], z["truth"], z["source"]
    I, K, N = S.shape
    full = S.mean(2).argmin(1)
    lines = [f"tuning set: {I} items ({', '.join(f'{s} {int((source == s).sum())}' for s in np.unique(source))}), "
             f"{K} classes, {N} shared samples per class",
             f"unpruned, all {N} samples: {np.mean(full == truth) * 100:.2f}% at {N * K} evals/image",
             "| rule | min_scores | p_cutoff | samples/round | accuracy % | changed decisions | evals/image "
             "| p99 | max |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for rule, m, p, r in CANDIDATES:
        cfg = ScoringConfig(rule=rule, min_scores=m, p_cutoff=p, samples_per_round=r, max_scores=N)
        pred, ev = replay(S, cfg)
        acc, changed = float(np.mean(pred == truth)), int(np.sum(pred != full))
        rows.append((rule, m, p, r, acc, changed, float(ev.mean())))
        lines.append(f"| {rule} | {m} | {p:g} | {r} | {acc * 100:.2f} | {changed} | {ev.mean():.1f} | "
                     f"{np.percentile(ev, 99):.0f} | {ev.max()} |")
    base = float(np.mean(full == truth))
    ok = [row for row in rows if row[5] == 0 and row[4] >= base]
    lines.append("")
    lines.append("criterion (fixed before the sweep): fewest evals/image among settings with no changed "
                 "decision and no accuracy lost against the unpruned classifier")
    if ok:
        best = min(ok, key=lambda row: row[6])
        lines.append(f"chosen: rule={best[0]} min_scores={best[1]} p_cutoff={best[2]:g} "
                     f"samples_per_round={best[3]}: {best[4] * 100:.2f}% at {best[6]:.1f} evals/image")
    else:
        lines.append("no setting meets the criterion")
    text = "\n".join(lines)
    print(text)
    OUT.write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--fold", type=int, required=True)
    t.add_argument("--threads", type=int, default=1)
    b = sub.add_parser("bank")
    b.add_argument("--n", type=int, default=96)
    sub.add_parser("sweep")
    args = ap.parse_args()
    {"train": cmd_train, "bank": cmd_bank, "sweep": cmd_sweep}[args.cmd](args)


if __name__ == "__main__":
    main()
