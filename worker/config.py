"""Scoring parameters: one frozen dataclass, stored with every job.

Defaults follow Clark & Jaini (2023), section 3 and Algorithm 1, except where a
measured figure in the README says otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: Weighting of the per-sample error: "heuristic" is exp(-c t) on the x0-space error
#: (Clark & Jaini, appendix; for flow-matching models t is sigma); "uniform" is the plain
#: epsilon error (Li et al. 2023); "velocity" the plain velocity error (the flow-matching
#: training loss; v-parameterisation for DDPM models).
DEFAULT_WEIGHTING = "heuristic"
#: The c in w(t) = exp(-c t). The paper's text uses 7, its appendix 6.
DEFAULT_WEIGHT_COEF = 7.0
#: Samples every surviving class gets before any class may be pruned. The paper uses 20;
#: with shared noise the paired differences are tight enough to decide sooner (chosen on
#: the digits validation slice: bench/results/tune_pruning_val.txt).
DEFAULT_MIN_SCORES = 5
#: Budget: a class never gets more samples than this; then the mean decides.
DEFAULT_MAX_SCORES = 2000
#: Prune a class when the one-sided paired t-test p-value is below this. The paper's 2e-3
#: is more conservative (and about twice as costly on digits at the same accuracy).
DEFAULT_P_CUTOFF = 2e-2
#: Samples added to every survivor per round after the first (the first round brings
#: every class to ``min_scores``). Larger rounds keep batches full; smaller rounds
#: prune sooner. The paper's Algorithm 1 is 1.
DEFAULT_SAMPLES_PER_ROUND = 2
#: A later round adds at least this fraction of the samples each survivor already has
#: (rounded down): an item still undecided after 24 samples per class takes rounds that
#: grow by 1/8, so one that runs to ``max_scores`` needs about 50 rounds instead of 1,000
#: (each a round task, a transaction and a mostly empty model call). Items decided within
#: 24 samples, nearly all of them, are unaffected; the rest pay at most 1/8 extra
#: (bench/results/round_cost.txt). 0 keeps every round at ``samples_per_round``.
DEFAULT_ROUND_GROWTH = 0.125
#: A round of one item scores at most this many (class, sample) pairs: a larger round (1,000
#: classes x 5 samples) runs as consecutive rounds over class ranges, all on the round's
#: shared noise, and prunes once every class has its samples. 0: never split.
DEFAULT_MAX_ROUND_EVALS = 4096
#: Model inputs per forward pass (item x class x sample triples packed together).
DEFAULT_BATCH_SIZE = 256
#: Seed of the shared noise and timesteps.
DEFAULT_SEED = 0
#: Prompt template when neither the user nor the model gives one.
DEFAULT_TEMPLATE = "a photo of a {}."

WEIGHTINGS = ("heuristic", "uniform", "velocity")
#: Pruning rules: "ttest" is the paper's paired t-test after ``min_scores`` samples per
#: class; "pooled" screens on one sample per class, then runs a paired test whose variance
#: is pooled over the item's classes (worker.pruning.prune_pooled).
RULES = ("pooled", "ttest")
#: The library's rule is the paper's. The CLI picks by label count (``rule_for``): the pooled
#: rule above ``AUTO_POOLED_ABOVE`` labels, where its screening round applies. Its settings
#: were chosen on the many-label model's tuning split (seed 2) at K = 10, 100 and 1,000
#: (bench/results/many_labels_tune.txt). At 10 labels it scored 99.30% on the held-out digits
#: (t-test: 99.58%), so up to 10 labels the t-test stays the default.
DEFAULT_RULE = "ttest"
AUTO_POOLED_ABOVE = 10
#: min_scores, p_cutoff and samples_per_round when not given, per rule.
RULE_DEFAULTS = {
    "ttest": {"min_scores": DEFAULT_MIN_SCORES, "p_cutoff": DEFAULT_P_CUTOFF,
              "samples_per_round": DEFAULT_SAMPLES_PER_ROUND},
    "pooled": {"min_scores": 2, "p_cutoff": DEFAULT_P_CUTOFF, "samples_per_round": 1},
}
#: Pooled rule: samples per class in the screening round.
DEFAULT_SCREEN_SCORES = 1
#: Pooled rule: the screening round keeps the best max(screen_min, ceil(screen_keep * K)):
#: with 10 labels or fewer it keeps them all. Keeping 10% (or 10 classes at K = 100) after
#: one sample lost the true class of 2.5% of the tuning items; 20% lost none.
DEFAULT_SCREEN_KEEP = 0.2
DEFAULT_SCREEN_MIN = 10
#: Pooled rule: cap on the prior degrees of freedom the pooled variance brings.
DEFAULT_POOL_DF = 16.0


def rule_for(n_labels: int) -> str:
    """The CLI's default rule for ``n_labels`` labels."""
    return "pooled" if n_labels > AUTO_POOLED_ABOVE else "ttest"


@dataclass(frozen=True)
class ScoringConfig:
    """Parameters of the classifier; every job row stores them as ``to_dict()``."""

    weighting: str = DEFAULT_WEIGHTING
    weight_coef: float = DEFAULT_WEIGHT_COEF
    #: None: the rule's default (RULE_DEFAULTS).
    min_scores: int | None = None
    max_scores: int = DEFAULT_MAX_SCORES
    p_cutoff: float | None = None
    #: None: the rule's default (RULE_DEFAULTS).
    samples_per_round: int | None = None
    round_growth: float = DEFAULT_ROUND_GROWTH
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = DEFAULT_SEED
    #: False scores every class on its own noise: only for the shared-noise ablation.
    shared_noise: bool = True
    #: False never prunes: every class gets ``max_scores`` samples.
    prune: bool = True
    rule: str = DEFAULT_RULE
    screen_scores: int = DEFAULT_SCREEN_SCORES
    screen_keep: float = DEFAULT_SCREEN_KEEP
    screen_min: int = DEFAULT_SCREEN_MIN
    pool_df: float = DEFAULT_POOL_DF
    max_round_evals: int = DEFAULT_MAX_ROUND_EVALS

    def __post_init__(self) -> None:
        from worker.errors import UsageError

        if self.rule not in RULES:
            raise UsageError(f"unknown pruning rule {self.rule!r}: use one of {', '.join(RULES)}")
        for name, value in RULE_DEFAULTS[self.rule].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.screen_scores < 1:
            raise UsageError("screen_scores must be at least 1")
        if not 0.0 < self.screen_keep <= 1.0:
            raise UsageError(f"screen_keep must be in (0, 1], got {self.screen_keep}")
        if self.screen_min < 1:
            raise UsageError("screen_min must be at least 1")
        if self.pool_df < 0:
            raise UsageError("pool_df must be >= 0")
        if self.max_round_evals < 0:
            raise UsageError("max_round_evals must be >= 0 (0: never split a round)")

        if self.weighting not in WEIGHTINGS:
            raise UsageError(f"unknown weighting {self.weighting!r}: use one of {', '.join(WEIGHTINGS)}")
        if self.min_scores < 2:
            raise UsageError("min_scores must be at least 2 (a t-test needs two samples)")
        if self.max_scores < self.min_scores:
            raise UsageError(f"max_scores ({self.max_scores}) must be >= min_scores ({self.min_scores})")
        if not 0.0 < self.p_cutoff < 1.0:
            raise UsageError(f"p_cutoff must be in (0, 1), got {self.p_cutoff}")
        if self.samples_per_round < 1:
            raise UsageError("samples_per_round must be at least 1")
        if not 0.0 <= self.round_growth <= 1.0:
            raise UsageError(f"round_growth must be in [0, 1], got {self.round_growth}")
        if self.batch_size < 1:
            raise UsageError("batch_size must be at least 1")

    def round_size(self, round_index: int, scored: int) -> int:
        """Samples to add to each survivor in round ``round_index`` given ``scored`` so far."""
        step = max(self.samples_per_round, int(scored * self.round_growth))
        target = self.first_round_samples() if round_index == 0 else max(scored + step, self.min_scores)
        if not self.prune:
            target = self.max_scores
        return max(0, min(target, self.max_scores) - scored)

    def first_round_samples(self) -> int:
        """Samples every class gets in an item's first round."""
        if not self.prune:
            return self.max_scores
        return self.screen_scores if self.rule == "pooled" else self.min_scores

    def classes_per_round(self, n_samples: int) -> int | None:
        """Classes one stored round scores at ``n_samples`` each; None: all of them."""
        if not self.max_round_evals:
            return None
        return max(1, self.max_round_evals // max(1, n_samples))

    def items_per_task(self, n_classes: int, most: int, task_evals: int) -> int:
        """Items per round task, so that a task's first round stays within ``task_evals``
        model evaluations (at least one item, at most ``most``)."""
        n = self.first_round_samples()
        per = self.classes_per_round(n)
        evals = n * (n_classes if per is None else min(per, n_classes))
        return max(1, min(most, task_evals // max(1, evals)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoringConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # Jobs stored before round_growth (or the rule) existed keep the rounds and the
        # t-test they started with.
        data = {"round_growth": 0.0, "rule": "ttest", "max_round_evals": 0, **data}
        return cls(**{k: v for k, v in data.items() if k in names})
