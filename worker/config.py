"""Scoring parameters: one frozen dataclass, stored with every job.

Defaults follow Clark & Jaini (2023), section 3 and Algorithm 1, except where a
measured figure in the README says otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: Weighting of the per-sample error: "heuristic" is exp(-c t) on the x0-space error
#: (Clark & Jaini, appendix); "uniform" is the plain epsilon error (Li et al. 2023).
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
#: Model inputs per forward pass (item x class x sample triples packed together).
DEFAULT_BATCH_SIZE = 256
#: Seed of the shared noise and timesteps.
DEFAULT_SEED = 0
#: Prompt template when neither the user nor the model gives one.
DEFAULT_TEMPLATE = "a photo of a {}."

WEIGHTINGS = ("heuristic", "uniform")


@dataclass(frozen=True)
class ScoringConfig:
    """Parameters of the classifier; every job row stores them as ``to_dict()``."""

    weighting: str = DEFAULT_WEIGHTING
    weight_coef: float = DEFAULT_WEIGHT_COEF
    min_scores: int = DEFAULT_MIN_SCORES
    max_scores: int = DEFAULT_MAX_SCORES
    p_cutoff: float = DEFAULT_P_CUTOFF
    samples_per_round: int = DEFAULT_SAMPLES_PER_ROUND
    round_growth: float = DEFAULT_ROUND_GROWTH
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = DEFAULT_SEED
    #: False scores every class on its own noise: only for the shared-noise ablation.
    shared_noise: bool = True
    #: False never prunes: every class gets ``max_scores`` samples.
    prune: bool = True

    def __post_init__(self) -> None:
        from worker.errors import UsageError

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
        target = self.min_scores if round_index == 0 else scored + step
        if not self.prune:
            target = self.max_scores
        return max(0, min(target, self.max_scores) - scored)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoringConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # Jobs stored before round_growth existed keep the fixed rounds they started with.
        data = {"round_growth": 0.0, **data}
        return cls(**{k: v for k, v in data.items() if k in names})
