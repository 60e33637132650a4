"""The round/prune/finish logic for one item, shared by both executors.

Pure numpy: the in-process classifier keeps ``ItemRounds`` objects in memory; the
distributed scheduler rebuilds them from the score rows in the database. Both call
``plan`` (how many samples the next round adds) and ``record`` (add a round's scores,
prune, decide whether the item is finished), so they make identical decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from worker.config import ScoringConfig
from worker.pruning import best_class, margin, paired_p_value, prune


@dataclass
class ItemRounds:
    n_classes: int
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    history: list[list[int]] = field(default_factory=list)  # survivors after each round
    rounds_done: int = 0
    n_evals: int = 0

    def __post_init__(self) -> None:
        if not self.survivors:
            self.survivors = list(range(self.n_classes))
        for k in range(self.n_classes):
            self.scores.setdefault(k, np.zeros(0))

    @property
    def scored(self) -> int:
        """Samples every current survivor has."""
        return min(len(self.scores[k]) for k in self.survivors)

    def finished(self, config: ScoringConfig) -> bool:
        return len(self.survivors) <= 1 or self.scored >= config.max_scores

    def plan(self, config: ScoringConfig) -> int:
        """Samples to add to every survivor next round; 0 once finished."""
        if self.finished(config):
            return 0
        return config.round_size(self.rounds_done, self.scored)

    def record(self, classes: list[int], errors: np.ndarray, config: ScoringConfig) -> None:
        """Add one round's (len(classes), n) errors, then prune the survivors.

        Errors are taken at float32, the precision the job store keeps, so a state kept in
        memory, one rebuilt from stored rows and the in-process classifier's are bit-identical."""
        errors = np.asarray(errors, dtype=np.float32)
        for row, k in enumerate(classes):
            self.scores[k] = np.concatenate([self.scores[k], errors[row]])
        self.n_evals += int(errors.size)
        self.rounds_done += 1
        if config.prune:
            self.survivors = prune(self.scores, self.survivors,
                                   min_scores=config.min_scores, p_cutoff=config.p_cutoff)
        self.history.append(list(self.survivors))

    def winner(self) -> int:
        return best_class(self.scores, self.survivors)

    def margin(self) -> float:
        scored = [k for k in range(self.n_classes) if len(self.scores[k])]
        return margin(self.scores, scored)

    def separation(self) -> float:
        """1 - p of the paired t-test that the runner-up is no worse than the winner.

        A probability-like signal in [0, 1] that needs no calibration; the winner is
        measured against every other class on their shared samples and the weakest
        separation is kept.
        """
        b = self.winner()
        others = [k for k in range(self.n_classes) if k != b and len(self.scores[k]) >= 2]
        if not others:
            return 1.0
        return min(1.0 - paired_p_value(self.scores[k], self.scores[b]) for k in others)

    def mean_scores(self) -> dict[int, float]:
        return {k: float(np.mean(v)) for k, v in self.scores.items() if len(v)}
