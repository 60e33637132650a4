"""Successive elimination with a paired t-test (Clark & Jaini 2023, Algorithm 1).

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
