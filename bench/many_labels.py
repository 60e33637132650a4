"""Pruning rules at K = 10 ... 1,000 labels on the many-label shapes model (models/shapes-many).

For each K, every image gets random label subsets of size K that contain its true caption
(drawn from the model's 1,120 captions). Each rule then runs the engine's own round logic
(``worker.rounds.ItemRounds``: plan, record, prune) on those subsets. The errors come from
a bank of real model evaluations: sample j of an image has one fixed (t_j, eps_j), the
error of (image, class, sample j) is computed the first time any rule asks for it and
reused after, so all rules and subsets are compared on the same paired samples and the
fixed budget costs no more than the most expensive rule. (The engine draws each round's
samples stratified within the round; here they come from one stratified draw of
``--n-max`` samples taken in order, so prefixes are i.i.d.-like in t.)

Reported per (K, rule): accuracy, evaluations per image (mean, median, 99th percentile),
the false-prune rate (items whose true class was pruned), and seconds per image: the
evaluations at the model rate measured while filling the bank, plus the rule's own time.

    python bench/many_labels.py                       # held-out split (seed 1), the README table
    python bench/many_labels.py --split tune --ks 10  # the tuning split (seed 2) for choosing defaults

Writes bench/results/many_labels[_tune].{txt,json} and, for the held-out split, many_labels.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker import shapes as S  # noqa: E402
from worker import torch_setup  # noqa: E402
from worker.backends import load_backend  # noqa: E402
from worker.config import ScoringConfig  # noqa: E402
from worker.noise import draw  # noqa: E402
from worker.rounds import ItemRounds  # noqa: E402
from worker.scoring import weighted_errors  # noqa: E402

SPLITS = {"heldout": S.TEST_SEED, "tune": 2}
#: Images per K (fewer at large K: each costs K x samples evaluations to bank).
DEFAULT_IMAGES = {10: 300, 100: 150, 300: 80, 1000: 40}


def sweep_rules(cap: int, K: int) -> dict[str, ScoringConfig]:
    """The pooled rule's settings tried on the tuning split (``--sweep``), plus the references."""
    import itertools

    out = {"fixed 5 (no pruning)": ScoringConfig(prune=False, max_scores=5),
           "t-test (today: min 5, p 0.02)": ScoringConfig(rule="ttest", max_scores=cap)}
    for keep, smin, df, p, spr in itertools.product((0.02, 0.05, 0.1, 0.2), (3, 5, 10), (0, 4, 8, 16, 32, 64),
                                                   (0.005, 0.01, 0.02, 0.05), (1, 2)):
        if K <= smin and keep != 0.1:
            continue  # no screening at this K: the fraction does not matter
        out[f"pooled keep {keep} min {smin} df {df} p {p} spr {spr}"] = ScoringConfig(
            rule="pooled", screen_keep=keep, screen_min=smin, pool_df=df, p_cutoff=p, samples_per_round=spr,
            max_scores=cap)
    return out


def rules(cap: int, K: int) -> dict[str, ScoringConfig]:
    """The rules compared; every one is capped at ``cap`` samples per class (the bank's depth)."""
    fixed = (5, 10, 32) if K <= 10 else (5, 10)
    return {
        **{f"fixed {n} (no pruning)": ScoringConfig(prune=False, max_scores=n) for n in fixed},
        "t-test (today: min 5, p 0.02)": ScoringConfig(rule="ttest", max_scores=cap),
        "pooled, no screening": ScoringConfig(rule="pooled", screen_keep=1.0, max_scores=cap),
        "pooled (default)": ScoringConfig(rule="pooled", max_scores=cap),
    }


class Bank:
    """Errors of (image, class, sample j), computed on first use and kept."""

    def __init__(self, backend, x0: torch.Tensor, cond: torch.Tensor, keys: list[str], n_max: int,
                 config: ScoringConfig, batch: int = 256):
        self.backend, self.x0, self.cond, self.config, self.batch = backend, x0, cond, config, batch
        sched = backend.schedule
        self.T = sched.num_timesteps
        self.abar = sched.alphas_cumprod.float()
        draws = [draw(config.seed, k, 0, n_max, tuple(x0.shape[1:]), self.T) for k in keys]
        self.t = torch.stack([d[0] for d in draws])  # (I, n_max)
        self.eps = torch.stack([d[1] for d in draws])  # (I, n_max, C, H, W)
        self.E = np.full((len(keys), cond.shape[0], n_max), np.nan, np.float32)
        self.evals = 0
        self.seconds = 0.0

    def fill(self, wants: list[tuple[int, list[int], int, int]]) -> None:
        """Compute every missing (i, k, j) for j in [lo, hi) of each (i, classes, lo, hi)."""
        rows = []
        for i, classes, lo, hi in wants:
            block = self.E[i][np.asarray(classes)][:, lo:hi]
            miss = np.argwhere(np.isnan(block))
            rows += [(i, classes[a], lo + b) for a, b in miss]
        if not rows:
            return
        start = time.perf_counter()
        r = torch.tensor(rows, dtype=torch.long)
        with torch.inference_mode():
            for s in range(0, len(r), self.batch):
                ii, kk, jj = r[s : s + self.batch].T
                t = self.t[ii, jj]
                eps = self.eps[ii, jj]
                x0 = self.x0[ii]
                abar = self.abar[t].view(-1, 1, 1, 1)
                x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
                out = self.backend.predict(x_t, t, self.cond[kk])
                err = weighted_errors(out, x0, eps, x_t, t, abar, self.T,
                                      self.backend.schedule.prediction_type, self.config)
                self.E[ii.numpy(), kk.numpy(), jj.numpy()] = err.float().numpy()
        self.evals += len(rows)
        self.seconds += time.perf_counter() - start

    @property
    def seconds_per_eval(self) -> float:
        return self.seconds / max(self.evals, 1)


@dataclass
class Outcome:
    correct: np.ndarray
    evals: np.ndarray
    false_pruned: np.ndarray
    rule_seconds: float


def replay(bank: Bank, subsets: list[np.ndarray], truth_local: np.ndarray, config: ScoringConfig) -> Outcome:
    """Run ``config``'s rounds on every (image, subset) in lockstep; subsets[i] maps local -> global class."""
    n = len(subsets)
    states = [ItemRounds(len(s)) for s in subsets]
    live = list(range(n))
    rule_seconds = 0.0
    while live:
        plans = []
        for i in live:
            k = states[i].plan(config)
            if k > 0:
                lo = states[i].scored
                plans.append((i, lo, lo + k))
        if not plans:
            break
        bank.fill([(i, subsets[i][states[i].survivors].tolist(), lo, hi) for i, lo, hi in plans])
        start = time.perf_counter()
        for i, lo, hi in plans:
            st = states[i]
            glob = subsets[i][st.survivors]
            st.record(list(st.survivors), bank.E[i][glob][:, lo:hi], config)
        rule_seconds += time.perf_counter() - start
        live = [i for i, _, _ in plans]
    pred = np.array([st.winner() for st in states])
    evals = np.array([st.n_evals for st in states])
    pruned = np.array([config.prune and t not in st.survivors for st, t in zip(states, truth_local)])
    return Outcome(pred == truth_local, evals, pruned, rule_seconds)


def draw_subsets(truth: np.ndarray, K: int, n_classes: int, n_subsets: int, seed: int
                 ) -> list[list[np.ndarray]]:
    """subsets[s][i]: K global class ids containing truth[i], in random order."""
    out = []
    for s in range(n_subsets):
        rng = np.random.default_rng([seed, K, s])
        row = []
        for t in truth:
            others = np.delete(np.arange(n_classes), t)
            pick = np.append(rng.choice(others, K - 1, replace=False), t)
            row.append(rng.permutation(pick))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / S.MANY.model_dir))
    ap.add_argument("--split", choices=sorted(SPLITS), default="heldout")
    ap.add_argument("--ks", default="10,100,300,1000")
    ap.add_argument("--images", default=None, help="images per K, e.g. 300,150,80,40 (default: "
                    + ",".join(str(v) for v in DEFAULT_IMAGES.values()) + ")")
    ap.add_argument("--subsets", type=int, default=2, help="label subsets per image and K")
    ap.add_argument("--n-max", type=int, default=48, help="bank depth: samples per class at most")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="try the pooled rule's settings (tuning split)")
    ap.add_argument("--only", default=None, help="comma-separated parts of the rule names to run")
    ap.add_argument("--bank", default=None, help="keep the banked errors in this .npy file and reuse them")
    ap.add_argument("--out", default=None)
    ap.add_argument("--combine", nargs="+", metavar="STEM", help="merge earlier runs' tables into --out "
                    "(default bench/results/many_labels) with one plot")
    args = ap.parse_args()
    if args.combine:
        combine(args.combine, args.out or str(ROOT / "bench" / "results" / "many_labels"))
        return
    torch_setup.configure(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    counts = ([int(v) for v in args.images.split(",")] if args.images
              else [DEFAULT_IMAGES.get(k, 40) for k in ks])
    seed = SPLITS[args.split]
    backend = load_backend(args.model, device="cpu")
    scenes_all = S.MANY.scenes()
    captions = [sc.caption(S.MANY.eval_caption) for sc in scenes_all]
    index = {c: i for i, c in enumerate(captions)}
    n_img = max(counts)
    images, scenes = S.make_dataset(n_img, seed, S.MANY)
    truth = np.array([index[sc.caption(S.MANY.eval_caption)] for sc in scenes])
    x0 = S.to_tensor(images)
    cond = backend.encode_prompts(captions)
    base = ScoringConfig()
    bank = Bank(backend, x0, cond, [f"many-{seed}-{i}" for i in range(n_img)], args.n_max, base)
    if args.bank and Path(args.bank).exists():
        saved = np.load(args.bank)
        if saved.shape == bank.E.shape:
            bank.E = saved
            timing = json.loads(Path(args.bank + ".json").read_text())
            bank.evals, bank.seconds = timing["evals"], timing["seconds"]
            print(f"reusing {int(np.isfinite(saved).sum())} banked errors from {args.bank}", file=sys.stderr)
    table = []
    for K, n in zip(ks, counts):
        subs = draw_subsets(truth[:n], K, len(captions), args.subsets, seed)
        for name, cfg in (sweep_rules if args.sweep else rules)(args.n_max, K).items():
            if args.only and not any(o in name for o in args.only.split(",")):
                continue
            outs = []
            for row in subs:
                local = np.array([int(np.where(s == t)[0][0]) for s, t in zip(row, truth[:n])])
                outs.append(replay(bank, row, local, cfg))
            correct = np.concatenate([o.correct for o in outs])
            evals = np.concatenate([o.evals for o in outs])
            pruned = np.concatenate([o.false_pruned for o in outs])
            rule_s = sum(o.rule_seconds for o in outs) / len(correct)
            table.append({
                "K": K, "rule": name, "items": int(len(correct)), "images": n, "subsets": args.subsets,
                "accuracy": float(correct.mean()), "evals_mean": float(evals.mean()),
                "evals_median": float(np.median(evals)), "evals_p99": float(np.percentile(evals, 99)),
                "evals_per_K": float(evals.mean() / K), "false_prune": float(pruned.mean()),
                "rule_seconds": rule_s, "config": cfg.to_dict(),
            })
            print(f"K={K:5d} {name:48s} acc {correct.mean() * 100:6.2f}%  evals {evals.mean():8.1f} "
                  f"({evals.mean() / K:.2f} K)  false-prune {pruned.mean() * 100:.2f}%", flush=True)
    if args.bank:
        np.save(args.bank, bank.E)
        Path(args.bank + ".json").write_text(json.dumps({"evals": bank.evals, "seconds": bank.seconds}))
    spe = bank.seconds_per_eval
    for row in table:
        row["seconds_per_image"] = row["evals_mean"] * spe + row["rule_seconds"]
    lines = [f"many-label shapes model, {args.split} split: the first images of make_dataset({n_img}, "
             f"seed={seed}, MANY) (per K: {', '.join(f'{k}: {c}' for k, c in zip(ks, counts))}), "
             f"{len(captions)} captions; {args.subsets} random label subsets per image containing the "
             f"truth; every rule capped at {args.n_max} samples per class",
             f"model rate while banking: {1 / spe:.0f} evaluations/s on {args.threads} CPU thread(s) "
             f"({bank.evals} evaluations banked in {bank.seconds:.0f} s)", ""] + table_lines(table)
    text = "\n".join(lines)
    print("\n" + text)
    stem = args.out or str(ROOT / "bench" / "results" / ("many_labels" if args.split == "heldout"
                                                         else "many_labels_tune"))
    Path(stem + ".txt").write_text(text + "\n")
    Path(stem + ".json").write_text(json.dumps({"rows": table, "seconds_per_eval": spe,
                                                "evals_banked": bank.evals}, indent=1) + "\n")
    if args.split == "heldout" and not args.sweep:
        plot(table, stem + ".png")


def table_lines(table: list[dict]) -> list[str]:
    lines = ["| K | rule | items | accuracy % | evals/image mean | median | p99 | mean / K | "
             "false-prune % | s/image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['K']} | {r['rule']} | {r['items']} | {r['accuracy'] * 100:.2f} | "
                     f"{r['evals_mean']:.1f} | {r['evals_median']:.0f} | {r['evals_p99']:.0f} | "
                     f"{r['evals_per_K']:.2f} | {r['false_prune'] * 100:.2f} | {r['seconds_per_image']:.2f} |")
    return lines


def combine(stems: list[str], out: str) -> None:
    """One table, JSON and plot from several runs (each with its own images and bank)."""
    table, heads = [], []
    for stem in stems:
        table += json.loads(Path(stem + ".json").read_text())["rows"]
        heads += Path(stem + ".txt").read_text().split("\n\n")[0].splitlines()
    table.sort(key=lambda r: r["K"])
    text = "\n".join(heads + [""] + table_lines(table))
    print(text)
    Path(out + ".txt").write_text(text + "\n")
    Path(out + ".json").write_text(json.dumps({"rows": table, "parts": stems}, indent=1) + "\n")
    plot(table, out + ".png")


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["rule"] for r in table):
        rows = [r for r in table if r["rule"] == name]
        ks = [r["K"] for r in rows]
        a.plot(ks, [r["evals_mean"] for r in rows], "o-", label=name)
        b.plot(ks, [r["accuracy"] * 100 for r in rows], "o-", label=name)
    a.plot(ks, ks, "k:", label="K evaluations")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("labels K")
    a.set_yscale("log")
    a.set_ylabel("evaluations per image (mean)")
    b.set_ylabel("accuracy %")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
