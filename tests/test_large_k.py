"""Large label sets: the pooled rule, screening, rounds split by class range, task sizing.

Synthetic score matrices are built the way shared noise makes them (a per-sample term
common to every class, a class offset, a small own term); engine tests run the tiny
pixel model end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from worker.classifier import classify_images
from worker.config import ScoringConfig
from worker.errors import UsageError
from worker.pruning import paired_p_value, pooled_p_values, prune_pooled, screen
from worker.rounds import ItemRounds

LABELS = ["cat", "dog", "bird", "fish", "car", "digit"]


def scores_for(rng, means, n, shared_sd=1.0, own_sd=0.1, own=None):
    shared = rng.normal(0.0, shared_sd, n)
    own = own if own is not None else [own_sd] * len(means)
    return {k: (shared + m + rng.normal(0.0, own[k], n)).astype(np.float32) for k, m in enumerate(means)}


def test_pooled_test_without_prior_is_the_paired_t_test():
    rng = np.random.default_rng(0)
    s = scores_for(rng, [0.0, 0.05, 0.1, 0.3], 6)
    d = np.stack([s[k].astype(np.float64) - s[0] for k in (1, 2, 3)])
    want = [paired_p_value(s[k], s[0]) for k in (1, 2, 3)]
    assert pooled_p_values(d, prior_df=0) == pytest.approx(want, rel=1e-9)
    # one rival: nothing to pool, whatever the prior weight
    assert pooled_p_values(d[:1], prior_df=8) == pytest.approx(want[:1], rel=1e-9)


def test_pooled_test_prunes_after_two_samples_where_the_t_test_cannot():
    """Two samples: one degree of freedom makes the plain t-test nearly powerless; the
    variance pooled over 99 other classes makes a clear gap decidable."""
    rng = np.random.default_rng(1)
    means = [0.0] + [1.0] * 99
    s = scores_for(rng, means, 2)
    survivors = list(range(100))
    plain = [k for k in survivors[1:] if paired_p_value(s[k], s[0]) < 0.02]
    pooled = prune_pooled(s, survivors, min_scores=2, p_cutoff=0.02, prior_df=8)
    assert len(plain) < 60
    assert pooled == [0]


def test_pooled_false_prune_rate_is_near_the_cutoff():
    """With equal variances, a class exactly as good as the best is pruned at about p_cutoff."""
    rng = np.random.default_rng(2)
    pruned = trials = 0
    for _ in range(400):
        s = scores_for(rng, [0.0, 0.0] + [0.5] * 30, 3)
        survivors = prune_pooled(s, list(range(32)), min_scores=2, p_cutoff=0.05, prior_df=8)
        trials += 1
        pruned += (0 not in survivors) + (1 not in survivors)
    assert pruned / trials < 0.12  # one of the two tied classes is best, the other at risk


def test_screen_keeps_the_best_fraction_and_at_least_keep_min():
    s = {k: np.array([float(v)], np.float32) for k, v in enumerate([5, 1, 4, 2, 3, 0, 6, 7, 8, 9])}
    assert screen(s, list(range(10)), keep=0.3, keep_min=2) == [1, 3, 5]
    assert screen(s, list(range(10)), keep=0.1, keep_min=2) == [1, 5]
    assert screen(s, list(range(10)), keep=1.0, keep_min=2) == list(range(10))
    assert screen(s, [0, 6, 7], keep=0.1, keep_min=5) == [0, 6, 7]


def test_pooled_rule_screens_after_the_first_round_only():
    cfg = ScoringConfig(rule="pooled", screen_keep=0.25, screen_min=2, max_scores=20)
    assert (cfg.min_scores, cfg.p_cutoff) == (2, 0.02)
    st = ItemRounds(8)
    assert st.plan(cfg) == 1 and st.round_classes(cfg) == list(range(8))
    st.record(list(range(8)), np.array([[3.0], [0.0], [5.0], [1.0], [6.0], [7.0], [8.0], [9.0]]), cfg)
    assert st.survivors == [1, 3]
    assert st.plan(cfg) == 1  # then up to min_scores (2), the first test, then 1 per round
    st.record([1, 3], np.array([[0.0, 0.1], [0.9, 1.2]]), cfg)
    assert st.survivors in ([1], [1, 3])


def test_rules_are_validated_and_old_jobs_keep_theirs():
    with pytest.raises(UsageError, match="unknown pruning rule"):
        ScoringConfig(rule="halving")
    with pytest.raises(UsageError, match="screen_keep"):
        ScoringConfig(rule="pooled", screen_keep=0.0)
    old = ScoringConfig.from_dict({"min_scores": 5, "max_scores": 100, "p_cutoff": 0.02})
    assert (old.rule, old.max_round_evals) == ("ttest", 0)
    assert ScoringConfig.from_dict(ScoringConfig(rule="pooled").to_dict()) == ScoringConfig(rule="pooled")


def test_items_per_task_keeps_a_first_round_within_the_budget():
    ttest, pooled = ScoringConfig(rule="ttest"), ScoringConfig(rule="pooled")
    assert ttest.items_per_task(10, 64, 16384) == 64  # 50 evaluations per item
    assert ttest.items_per_task(1000, 64, 16384) == 4  # rounds of 819 classes x 5 samples
    assert pooled.items_per_task(1000, 64, 16384) == 16  # one screening sample per class
    assert ScoringConfig(rule="ttest", max_round_evals=0).items_per_task(1000, 64, 16384) == 3
    assert ttest.items_per_task(100000, 64, 16384) >= 1


def test_split_round_state_matches_the_unsplit_one():
    """The same errors recorded in one round or in class ranges: the same survivors after."""
    rng = np.random.default_rng(3)
    whole, split = ScoringConfig(max_round_evals=0), ScoringConfig(max_round_evals=10)
    a, b = ItemRounds(12), ItemRounds(12)
    means = rng.normal(0, 0.3, 12)
    while a.plan(whole):
        n = a.plan(whole)
        shared = rng.normal(0, 1, n)
        errs = {k: shared + means[k] + rng.normal(0, 0.1, n) for k in range(12)}
        a.record(list(a.survivors), np.stack([errs[k] for k in a.survivors]), whole)
        noise = b.next_noise_round()
        parts = 0
        while True:
            assert b.plan(split) == n and b.next_noise_round() == noise
            cls = b.round_classes(split)
            assert len(cls) * n <= max(split.max_round_evals, n)
            b.record(cls, np.stack([errs[k] for k in cls]), split)
            parts += 1
            if not b.pending:
                break
        assert b.survivors == a.survivors and parts >= 1
    assert b.finished(split) and b.winner() == a.winner() and b.n_evals == a.n_evals
    assert b.rounds_done > a.rounds_done


def _images(n, size=10, seed=3):
    rng = np.random.default_rng(seed)
    return [(f"img{i}.png", Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB"))
            for i in range(n)]


@pytest.mark.parametrize("rule", ["ttest", "pooled"])
def test_classify_with_split_rounds_decides_as_unsplit(pixel_backend, rule):
    """Class ranges of one round share its noise: the same samples, scores and decisions."""
    items = _images(3)
    prompts = [f"a photo of a {w}" for w in LABELS]
    base = dict(rule=rule, min_scores=4 if rule == "ttest" else 2, max_scores=12, p_cutoff=0.2,
                screen_keep=0.5, screen_min=2, seed=1)
    whole = classify_images(pixel_backend, items, prompts, LABELS, ScoringConfig(max_round_evals=0, **base))
    split = classify_images(pixel_backend, items, prompts, LABELS, ScoringConfig(max_round_evals=5, **base))
    for a, b in zip(whole, split):
        assert (a.label, a.counts, a.n_evals, a.survivors[-1]) == (b.label, b.counts, b.n_evals, b.survivors[-1])
        assert a.scores == pytest.approx(b.scores, rel=1e-4)
        assert b.rounds > a.rounds



def test_the_cli_picks_the_pooled_rule_above_ten_labels():
    from orchestrator.local_commands import build_config
    from worker import config as C

    def kw(**over):
        base = dict(weighting=C.DEFAULT_WEIGHTING, weight_coef=C.DEFAULT_WEIGHT_COEF, min_scores=None,
                    max_scores=C.DEFAULT_MAX_SCORES, p_cutoff=None, samples_per_round=None,
                    batch_size=C.DEFAULT_BATCH_SIZE, seed=0, no_prune=False, rule=None,
                    screen_keep=C.DEFAULT_SCREEN_KEEP, screen_min=C.DEFAULT_SCREEN_MIN,
                    pool_df=C.DEFAULT_POOL_DF, max_round_evals=C.DEFAULT_MAX_ROUND_EVALS)
        return {**base, **over}

    ten, many = build_config(kw(), 10), build_config(kw(), 11)
    assert (ten.rule, ten.min_scores, ten.samples_per_round) == ("ttest", 5, 2)
    assert (many.rule, many.min_scores, many.samples_per_round) == ("pooled", 2, 1)
    assert build_config(kw(rule="ttest"), 1000).rule == "ttest"
    assert build_config(kw(rule="pooled", min_scores=3), 4).min_scores == 3
