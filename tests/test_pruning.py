"""Paired t-test pruning and the per-item round logic, on synthetic score matrices.

The round logic here is the paper's rule (rule="ttest"); tests/test_large_k.py has the pooled one.
Scores are built the way shared noise makes them: a per-sample term common to every
class (the same t_j, eps_j), a class offset (its true mean), and a small independent
term. Repeated trials check the error rates the p-value promises.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from worker.config import ScoringConfig
from worker.errors import UsageError
from worker.pruning import best_class, margin, paired_p_value, prune
from worker.rounds import ItemRounds


def paired_scores(rng: np.random.Generator, means, n: int, shared_sd: float = 1.0,
                  own_sd: float = 0.1) -> dict[int, np.ndarray]:
    """scores[k][j] = shared_j + means[k] + own_kj: paired samples, as shared noise gives."""
    shared = rng.normal(0.0, shared_sd, n)
    return {k: shared + m + rng.normal(0.0, own_sd, n) for k, m in enumerate(means)}


# --------------------------------------------------------------------------- paired_p_value


def test_p_value_matches_scipy_paired_t_test():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = paired_scores(rng, [0.0, 0.03], 25)
        want = stats.ttest_rel(s[1], s[0], alternative="greater").pvalue
        assert paired_p_value(s[1], s[0]) == pytest.approx(want, rel=1e-9)


def test_p_value_direction():
    rng = np.random.default_rng(1)
    s = paired_scores(rng, [0.0, 0.2], 30)
    assert paired_p_value(s[1], s[0]) < 1e-6  # class 1 clearly worse: tiny p
    assert paired_p_value(s[0], s[1]) > 1 - 1e-6  # asking the other way round


def test_p_value_identical_arrays_is_one():
    a = np.array([0.3, 0.1, 0.7, 0.2])
    assert paired_p_value(a, a.copy()) == 1.0


def test_p_value_zero_variance_differences():
    a = np.array([0.25, 0.125, 0.75, 1.5])  # exact binary fractions: d has sd exactly 0
    assert paired_p_value(a + 0.5, a) == 0.0  # always worse by the same amount
    assert paired_p_value(a - 0.5, a) == 1.0  # always better
    b = np.array([0.3, 0.1, 0.7, 0.2])  # rounding leaves sd ~ 1e-17: still decisive
    assert paired_p_value(b + 0.5, b) < 1e-12
    assert paired_p_value(b - 0.5, b) > 1 - 1e-12


@pytest.mark.parametrize("n", [0, 1])
def test_p_value_needs_two_samples(n):
    assert paired_p_value(np.full(n, 5.0), np.zeros(n)) == 1.0


def test_p_value_uses_shared_prefix_only():
    best = np.array([0.0, 0.0, 0.0, 0.0])
    worse = np.array([1.0, 1.1, 0.9, 1.0, -100.0, -100.0])  # extra samples best never saw
    assert paired_p_value(worse, best) < 1e-3


def test_p_value_is_finite_for_constant_scores():
    assert paired_p_value(np.ones(10), np.ones(10)) == 1.0


# --------------------------------------------------------------------------- prune


def test_nothing_pruned_before_min_scores():
    rng = np.random.default_rng(2)
    s = paired_scores(rng, [0.0, 5.0, 10.0], 19, own_sd=0.01)
    assert prune(s, [0, 1, 2], min_scores=20, p_cutoff=0.5) == [0, 1, 2]
    # Every survivor must have min_scores: one short class holds everyone back.
    s = paired_scores(rng, [0.0, 5.0, 10.0], 25, own_sd=0.01)
    s[2] = s[2][:19]
    assert prune(s, [0, 1, 2], min_scores=20, p_cutoff=0.5) == [0, 1, 2]


def test_clearly_worse_classes_pruned_right_after_min_scores():
    rng = np.random.default_rng(3)
    for _ in range(200):
        s = paired_scores(rng, [0.0, 0.5, 1.0, 0.02], 20)
        kept = prune(s, [0, 1, 2, 3], min_scores=20, p_cutoff=2e-3)
        assert 0 in kept and 1 not in kept and 2 not in kept


def test_single_survivor_and_pruned_classes_are_left_alone():
    s = {0: np.zeros(30), 1: np.ones(30), 2: np.full(30, 9.0)}
    assert prune(s, [2], min_scores=20, p_cutoff=0.5) == [2]
    assert prune(s, [1, 2], min_scores=20, p_cutoff=0.5) == [1]  # class 0 already gone


def test_best_class_and_tie_break():
    s = {0: np.array([1.0, 1.0]), 1: np.array([0.5, 0.5]), 2: np.array([0.5, 0.5])}
    assert best_class(s, [0, 1, 2]) == 1
    assert best_class(s, [2, 0]) == 2


def test_margin_is_runner_up_minus_winner():
    s = {0: np.array([2.0, 2.0]), 1: np.array([1.0, 1.5]), 2: np.array([3.0, 3.0])}
    assert margin(s, [0, 1, 2]) == pytest.approx(0.75)
    assert margin(s, [1]) == 0.0


TRIALS = 2000


@pytest.mark.parametrize("p_cutoff", [0.05, 0.2])
def test_equal_classes_pruned_at_the_nominal_rate(p_cutoff):
    """Two equally good classes: each is pruned at the first check with probability ~ p."""
    rng = np.random.default_rng(4)
    pruned = np.zeros(2)
    for _ in range(TRIALS):
        s = paired_scores(rng, [0.0, 0.0], 20, own_sd=0.3)
        kept = prune(s, [0, 1], min_scores=20, p_cutoff=p_cutoff)
        assert len(kept) >= 1
        pruned += [0 not in kept, 1 not in kept]
    rate = pruned / TRIALS
    slack = 4 * np.sqrt(p_cutoff * (1 - p_cutoff) / TRIALS)
    assert np.all(rate <= p_cutoff + slack), rate
    assert np.all(rate >= p_cutoff - slack), rate  # the test is not needlessly conservative


def test_true_best_essentially_never_pruned():
    rng = np.random.default_rng(5)
    best_pruned = 0
    others_pruned = 0
    for _ in range(TRIALS):
        s = paired_scores(rng, [0.0, 0.3, 0.4], 20, own_sd=0.3)
        kept = prune(s, [0, 1, 2], min_scores=20, p_cutoff=2e-3)
        best_pruned += 0 not in kept
        others_pruned += (1 not in kept) + (2 not in kept)
    assert best_pruned <= 2
    assert others_pruned > TRIALS  # the test has power: most worse classes go at once


def test_shared_noise_makes_pairing_matter():
    """A shared term 10x the class gap: the paired test still prunes the worse class."""
    rng = np.random.default_rng(6)
    s = paired_scores(rng, [0.0, 0.2], 20, shared_sd=2.0, own_sd=0.05)
    assert stats.ttest_ind(s[1], s[0], alternative="greater").pvalue > 0.05  # unpaired can't
    assert prune(s, [0, 1], min_scores=20, p_cutoff=2e-3) == [0]


# --------------------------------------------------------------------------- ItemRounds


def _record_round(state: ItemRounds, config: ScoringConfig, rng, means) -> int:
    n = state.plan(config)
    classes = list(state.survivors)
    if n:
        s = paired_scores(rng, [means[k] for k in classes], n, own_sd=0.3)
        state.record(classes, np.stack([s[i] for i in range(len(classes))]), config)
    return n


def test_plan_min_scores_first_then_rounds_capped_at_max():
    config = ScoringConfig(rule="ttest", min_scores=5, max_scores=14, samples_per_round=4, prune=True)
    state = ItemRounds(3)
    rng = np.random.default_rng(7)
    sizes = []
    while (n := _record_round(state, config, rng, [0.0, 0.0, 0.0])):
        sizes.append(n)
    # Equal classes rarely get pruned at p = 2e-3; if one is, rounds stay the same size.
    assert sizes[0] == 5
    assert all(n == 4 for n in sizes[1:-1])
    assert sum(sizes) <= 14 and (len(state.survivors) == 1 or sum(sizes) == 14)
    assert state.finished(config) and state.plan(config) == 0
    assert all(len(state.scores[k]) == 14 for k in state.survivors)


def test_round_plan_sizes_directly():
    config = ScoringConfig(rule="ttest", min_scores=20, max_scores=30, samples_per_round=4)
    assert config.round_size(0, 0) == 20
    assert config.round_size(1, 20) == 4
    assert config.round_size(3, 28) == 2  # capped at max_scores
    assert config.round_size(4, 30) == 0
    unpruned = ScoringConfig(rule="ttest", min_scores=20, max_scores=30, prune=False)
    assert unpruned.round_size(0, 0) == 30


def test_finished_when_one_survivor():
    config = ScoringConfig(rule="ttest", min_scores=4, max_scores=100, samples_per_round=2, p_cutoff=1e-2)
    state = ItemRounds(3)
    rng = np.random.default_rng(8)
    rounds = 0
    while _record_round(state, config, rng, [0.0, 2.0, 3.0]):
        rounds += 1
    assert state.survivors == [0] and state.winner() == 0
    assert rounds == 1  # gaps this large go at the first check
    assert state.n_evals == 3 * 4
    assert state.history == [[0]]
    assert state.finished(config) and state.plan(config) == 0
    assert 0.99 < state.separation() <= 1.0
    assert state.margin() == pytest.approx(2.0, abs=0.5)


def test_survivors_history_non_increasing_and_n_evals_counted():
    config = ScoringConfig(rule="ttest", min_scores=4, max_scores=60, samples_per_round=3, p_cutoff=0.05)
    rng = np.random.default_rng(9)
    for _ in range(20):
        state = ItemRounds(4)
        while _record_round(state, config, rng, [0.0, 0.05, 0.1, 0.4]):
            pass
        assert state.n_evals == sum(len(v) for v in state.scores.values())
        for before, after in zip(state.history, state.history[1:]):
            assert set(after) <= set(before) and after
        assert len(state.survivors) == 1 or min(len(state.scores[k]) for k in state.survivors) == 60


def test_prune_false_never_prunes():
    config = ScoringConfig(rule="ttest", min_scores=4, max_scores=12, samples_per_round=2, prune=False)
    state = ItemRounds(3)
    rng = np.random.default_rng(10)
    sizes = []
    while (n := _record_round(state, config, rng, [0.0, 5.0, 10.0])):
        sizes.append(n)
    assert sizes == [12]
    assert state.survivors == [0, 1, 2] and state.history == [[0, 1, 2]]
    assert state.winner() == 0 and state.n_evals == 36


def test_config_rejects_bad_values():
    for kwargs in ({"min_scores": 1}, {"min_scores": 30, "max_scores": 20}, {"p_cutoff": 0.0},
                   {"p_cutoff": 1.0}, {"samples_per_round": 0}, {"batch_size": 0},
                   {"weighting": "exp"}):
        with pytest.raises(UsageError):
            ScoringConfig(**kwargs)
    c = ScoringConfig(seed=4, weighting="uniform")
    assert ScoringConfig.from_dict({**c.to_dict(), "unknown": 1}) == c
