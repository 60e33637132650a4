"""Attribute binding on the shapes model, after Clark & Jaini (2023)'s CLEVR experiments.

Held-out images from ``worker.shapes.make_dataset(n, seed=1)`` (the model trained on
seed 0), each with two objects that differ in colour and in shape. For every image the
classifier chooses between two whole captions (template "{}"):

  binding: the true caption vs the colours swapped between the objects
           ("a red square and a blue circle" vs "a blue square and a red circle");
  colour:  the true caption vs one object's colour replaced by a colour not in the image;
  shape:   the true caption vs one object's shape replaced by the shape not in the image.

Chance is 50% on each. Only the binding foil uses exactly the words of the true caption,
so only it needs colour bound to shape. Captions name the left object first.

    python bench/binding.py [--model models/shapes] [--n 200] [--samples 32] [--prune] [--threads 1]

Prints a table, writes bench/results/binding.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker import shapes as S  # noqa: E402
from worker import torch_setup  # noqa: E402
from worker.backends import load_backend  # noqa: E402
from worker.classifier import classify_images  # noqa: E402
from worker.config import ScoringConfig  # noqa: E402
from worker.labels import prompts  # noqa: E402

TASKS = ("binding", "colour", "shape")
#: Seeds the choice of foil (which object, which replacement), not the images.
FOIL_SEED = 0


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (sensible at 0% and 100%, unlike p +- z se)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def foils(scenes: list[S.Scene], task: str) -> list[S.Scene]:
    rng = np.random.default_rng(FOIL_SEED)
    if task == "binding":
        return [sc.swapped() for sc in scenes]
    if task == "colour":
        return [S.colour_foil(sc, rng) for sc in scenes]
    if task == "shape":
        return [S.shape_foil(sc, rng) for sc in scenes]
    raise ValueError(task)


def run_task(backend, images: np.ndarray, scenes: list[S.Scene], task: str,
             config: ScoringConfig) -> dict:
    """Accuracy of choosing the true caption over the task's foil, one image at a time."""
    truth = [sc.caption() for sc in scenes]
    # Images sharing a candidate pair share one classify_images call (and its text embeddings).
    # Candidates are sorted so their order says nothing about which one is true.
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, (sc, foil) in enumerate(zip(scenes, foils(scenes, task))):
        groups[tuple(sorted((sc.caption(), foil.caption())))].append(i)
    correct = np.zeros(len(scenes), dtype=bool)
    evals = np.zeros(len(scenes))
    for labels, idx in groups.items():
        items = [(f"shapes-{S.TEST_SEED}-{i}", Image.fromarray(images[i])) for i in idx]
        res = classify_images(backend, items, prompts(S.DEFAULT_TEMPLATE, list(labels)), list(labels),
                              config)
        for i, r in zip(idx, res):
            correct[i] = r.label == truth[i]
            evals[i] = r.n_evals
    acc = float(correct.mean())
    return {"images": len(scenes), "accuracy": acc, "ci95": wilson(int(correct.sum()), len(scenes)),
            "chance": 0.5, "evals_per_image": float(evals.mean()), "candidate_pairs": len(groups),
            "correct": correct.tolist()}


def copies_of_training(images: np.ndarray) -> np.ndarray:
    """(N,) bool: held-out images pixel-identical to a training image (jitter is rasterised,
    so a few repeat exactly)."""
    train, _ = S.make_dataset(S.N_TRAIN, seed=S.TRAIN_SEED)
    seen = {x.tobytes() for x in train}
    return np.array([x.tobytes() in seen for x in images])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "shapes"))
    ap.add_argument("--n", type=int, default=200, help="held-out images")
    ap.add_argument("--samples", type=int, default=32,
                    help="samples per candidate (the budget; every candidate gets all of them "
                         "unless --prune)")
    ap.add_argument("--prune", action="store_true", help="paired t-test pruning, --samples as the cap")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; 1 on a busy machine)")
    args = ap.parse_args()
    torch_setup.configure(args.threads)
    torch.manual_seed(0)
    backend = load_backend(args.model, device=args.device)
    config = (ScoringConfig(max_scores=args.samples) if args.prune
              else ScoringConfig(prune=False, min_scores=min(args.samples, 5), max_scores=args.samples))
    images, scenes = S.make_dataset(args.n, seed=S.TEST_SEED)
    copies = copies_of_training(images)
    print(f"{args.n} held-out images (seed {S.TEST_SEED}), model {args.model}, "
          f"{'pruning, cap ' if args.prune else ''}{args.samples} samples per candidate", file=sys.stderr)

    rows = {}
    for task in TASKS:
        t0 = time.perf_counter()
        rows[task] = run_task(backend, images, scenes, task, config)
        rows[task]["seconds"] = time.perf_counter() - t0
        print(f"  {task}: {rows[task]['accuracy'] * 100:.1f}% in {rows[task]['seconds']:.0f} s",
              file=sys.stderr)

    print(f"\nAttribute binding on held-out shapes ({args.n} images, seed {S.TEST_SEED}; "
          f"template \"{S.DEFAULT_TEMPLATE}\", captions \"{S.EVAL_CAPTION}\"; "
          f"{'pruned, cap' if args.prune else 'fixed budget,'} {args.samples} samples per candidate)")
    print("| task | images | accuracy % | 95% CI (Wilson) | chance % | evals/image |")
    print("|---|---|---|---|---|---|")
    for task, r in rows.items():
        print(f"| {task} | {r['images']} | {r['accuracy'] * 100:.1f} | "
              f"{r['ci95'][0] * 100:.1f}-{r['ci95'][1] * 100:.1f} | "
              f"{r['chance'] * 100:.0f} | {r['evals_per_image']:.1f} |")
    novel = ~copies
    on_novel = ", ".join(f"{task} {np.mean(np.array(r['correct'])[novel]) * 100:.1f}%"
                         for task, r in rows.items())
    print(f"\n{int(copies.sum())} of {args.n} held-out images are pixel-identical to one of the "
          f"{S.N_TRAIN} training images; accuracy on the other {int(novel.sum())}: {on_novel}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(args.model).resolve()
    model_name = str(model_path.relative_to(ROOT)) if model_path.is_relative_to(ROOT) else args.model
    meta_path = Path(backend.path or "") / "difflabel.json"
    training = json.loads(meta_path.read_text()).get("training", {}) if meta_path.is_file() else {}
    (out / "binding.json").write_text(json.dumps({
        "model": model_name, "n_images": args.n, "copies_of_training_images": int(copies.sum()),
        "image_seed": S.TEST_SEED, "foil_seed": FOIL_SEED,
        "template": S.DEFAULT_TEMPLATE, "eval_caption": S.EVAL_CAPTION, "scoring": config.to_dict(),
        "tasks": rows,
        "model_training": {k: training.get(k) for k in ("steps", "batch_size", "final_loss", "seconds")},
    }, indent=2) + "\n")
    print(f"\nwrote {out / 'binding.json'}")


if __name__ == "__main__":
    main()
