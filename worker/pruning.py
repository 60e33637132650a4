"""Successive elimination: the paper's paired t-test, and a pooled rule that scales with K.

``prune`` is Clark & Jaini (2023)'s Algorithm 1: every class gets ``min_scores`` samples,
then a paired t-test against the current best removes classes that cannot win.

``screen`` and ``prune_pooled`` make up the rule for large label sets (``rule="pooled"``):
one screening sample per class keeps the best fraction, then a paired test whose variance
is shrunk toward the variance pooled over the item's other classes (the moderated t of
Smyth 2004, with the prior's degrees of freedom capped by what was pooled) can prune
after two samples instead of five.

Pure numpy/scipy on score arrays: no torch, no I/O, so the orchestrator's scheduler
and the in-process classifier make the same decisions from the same numbers.

A class's scores are the per-sample weighted denoising errors, lower is better. All
survivors of an item are scored on the same (t_j, eps_j) in every round, so the
first ``n`` scores of any two survivors are paired samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import special


def paired_p_value(worse: np.ndarray, best: np.ndarray) -> float:
    """One-sided p-value of a paired t-test that ``worse`` is really no worse than ``best``.

    With d_j = worse_j - best_j, H0: E[d] <= 0 against H1: E[d] > 0. A small p-value
    means the class behind ``worse`` is very unlikely to be the best: prune it.
    """
    n = min(len(worse), len(best))
    if n < 2:
        return 1.0
    d = np.asarray(worse[:n], dtype=np.float64) - np.asarray(best[:n], dtype=np.float64)
    mean = d.mean()
    sd = d.std(ddof=1)
    if not np.isfinite(sd) or sd == 0.0:
        # Identical differences: certain either way.
        return 0.0 if mean > 0 else 1.0
    t = mean / (sd / np.sqrt(n))
    # stats.t.sf(t, n - 1) is special.stdtr(n - 1, -t); called directly, without the
    # distribution object's argument checks (a tenth of the time; pruning runs every round).
    return float(special.stdtr(n - 1, -t))


def best_class(scores: Mapping[int, np.ndarray], survivors: Sequence[int]) -> int:
    """The survivor with the lowest mean score (ties go to the lower class index)."""
    return min(survivors, key=lambda k: (float(np.mean(scores[k])), k))


def prune(
    scores: Mapping[int, np.ndarray],
    survivors: Sequence[int],
    *,
    min_scores: int,
    p_cutoff: float,
) -> list[int]:
    """Return the survivors that a paired t-test against the current best cannot rule out.

    ``scores[k]`` holds every score class ``k`` has so far. No class is pruned until
    every survivor has ``min_scores`` samples. The best class always survives.
    """
    survivors = list(survivors)
    if len(survivors) <= 1:
        return survivors
    if min(len(scores[k]) for k in survivors) < min_scores:
        return survivors
    b = best_class(scores, survivors)
    return [k for k in survivors if k == b or paired_p_value(scores[k], scores[b]) >= p_cutoff]


def margin(scores: Mapping[int, np.ndarray], classes: Sequence[int]) -> float:
    """Smallest paired gap between the winner and any other scored class.

    For each other class k: mean(s_k - s_b) over the samples both were scored on. Positive
    when the winner beat every rival on their shared samples; 0 with a single class.
    """
    classes = [k for k in classes if len(scores[k])]
    if len(classes) < 2:
        return 0.0
    b = best_class(scores, classes)
    gaps = []
    for k in classes:
        if k != b:
            n = min(len(scores[k]), len(scores[b]))
            gaps.append(float(np.mean(scores[k][:n] - scores[b][:n])))
    return min(gaps)


def screen(scores: Mapping[int, np.ndarray], survivors: Sequence[int], *, keep: float,
           keep_min: int) -> list[int]:
    """The best ``max(keep_min, ceil(keep * K))`` survivors by mean score, in their order.

    A rank cut, with no test: it needs only one sample per class. Ties at the cut go to
    the lower class index, as in ``best_class``."""
    survivors = list(survivors)
    n_keep = max(keep_min, int(np.ceil(keep * len(survivors))))
    if n_keep >= len(survivors):
        return survivors
    means = np.array([float(np.mean(scores[k])) for k in survivors])
    order = np.lexsort((np.asarray(survivors), means))[:n_keep]
    kept = set(np.asarray(survivors)[order].tolist())
    return [k for k in survivors if k in kept]


def pooled_p_values(diffs: np.ndarray, prior_df: float) -> np.ndarray:
    """One-sided p-values of moderated paired t-tests, one per row of ``diffs`` (K', n).

    Row k holds d_kj = s_kj - s_bj against the current best. Its variance is shrunk toward
    the variance pooled over the *other* rows (leave-one-out, so a class never vouches for
    itself), weighted by d0 = min(prior_df, the other rows' degrees of freedom):

        v~_k = (d0 * s0_k^2 + (n - 1) * v_k) / (d0 + n - 1),   t = mean_k / sqrt(v~_k / n)

    on d0 + n - 1 degrees of freedom. With one other row or ``prior_df`` 0 it is the plain
    paired t-test."""
    k, n = diffs.shape
    if n < 2:
        return np.ones(k)
    d = diffs.astype(np.float64)
    mean = d.mean(axis=1)
    var = d.var(axis=1, ddof=1)
    others = k - 1
    if others >= 1 and prior_df > 0:
        s0 = (var.sum() - var) / others
        d0 = min(float(prior_df), others * (n - 1.0))
    else:
        s0, d0 = var, 0.0
    mod = (d0 * s0 + (n - 1) * var) / (d0 + n - 1)
    df = d0 + n - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / np.sqrt(mod / n)
    p = special.stdtr(df, -t)
    # No spread at all: certain either way, as in paired_p_value.
    flat = ~np.isfinite(t) | (mod <= 0)
    return np.where(flat, np.where(mean > 0, 0.0, 1.0), p)


def prune_pooled(scores: Mapping[int, np.ndarray], survivors: Sequence[int], *, min_scores: int,
                 p_cutoff: float, prior_df: float) -> list[int]:
    """``prune`` with the pooled (moderated) paired test; the best class always survives."""
    survivors = list(survivors)
    if len(survivors) <= 1:
        return survivors
    n = min(len(scores[k]) for k in survivors)
    if n < max(min_scores, 2):
        return survivors
    b = best_class(scores, survivors)
    rivals = [k for k in survivors if k != b]
    best = np.asarray(scores[b][:n], dtype=np.float64)
    diffs = np.stack([np.asarray(scores[k][:n], dtype=np.float64) - best for k in rivals])
    p = pooled_p_values(diffs, prior_df)
    drop = {k for k, pk in zip(rivals, p) if pk < p_cutoff}
    return [k for k in survivors if k not in drop]
